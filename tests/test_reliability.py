"""Faults injected into real runs: divergence, SIGKILL and resume, kills during checkpoint writes."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from cropyield import CropYieldDataModule, CropYieldRegressor, load_regressor
from cropyield.errors import TrainingDivergedError

from .conftest import BIN, ROOT_DIR, run, write_csv


def weights(path):
    model = load_regressor(path)
    return torch.cat([model.linear.weight.flatten(), model.linear.bias])


def test_divergence_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    run("cropyield", "fit", "--trainer.max_epochs", "2", cwd=tmp_path)
    previous = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    result = run("cropyield", "fit", "--model.lr", "1e5", cwd=tmp_path, check_rc=None)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "training diverged at epoch 1, step 3: the loss is inf" in errors[0]
    assert "lower the learning rate" in errors[0] and "standardize" in errors[0]
    assert "above the largest stable SGD step for this data (0.000112)" in result.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == previous


def test_divergence_at_the_tutorials_lr_1_never_writes_non_finite_weights(tmp_path):
    result = run("cropyield", "fit", "--model.lr", "1.0", cwd=tmp_path, check_rc=None)
    assert result.returncode == 2
    assert "training diverged at epoch 2, step 6: the loss is inf" in result.stderr
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert torch.isfinite(weights(path)).all()


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path, quiet):
    model = CropYieldRegressor()
    trainer = L.Trainer(max_epochs=1, **quiet)
    trainer.fit(model, CropYieldDataModule())
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"linear.weight became non-finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def fit_killed_then_resumed(folder, *args, epochs: int):
    """Starts `cropyield fit`, SIGKILLs it once a few epochs are checkpointed, then resumes it."""
    command = [str(BIN / "cropyield"), "fit", *args, "--trainer.max_epochs", str(epochs)]
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    reached = torch.load(last, weights_only=True)["epoch"]
    assert reached < epochs - 1
    result = run("cropyield", "fit", *args, "--trainer.max_epochs", epochs, "--ckpt_path", "last", cwd=folder)
    assert "Restored all states" in result.stdout
    return reached


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--config", "from_scratch.yaml"]], ids=["tutorial", "manual"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, args):
    epochs = 400
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    run("cropyield", "fit", *args, "--trainer.max_epochs", epochs, cwd=tmp_path / "full")
    reached = fit_killed_then_resumed(tmp_path / "killed", *args, epochs=epochs)
    assert 3 <= reached < epochs - 1
    full = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed = weights(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert torch.equal(full, resumed)


WRITER = """
import sys, torch
from cropyield.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for i in range(10**6):
    io.save_checkpoint({"state_dict": {"w": torch.full((2_000_000,), float(i))}}, path)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_never_leaves_a_corrupt_file(tmp_path):
    from cropyield.inference import read_checkpoint

    path = tmp_path / "last.ckpt"
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()  # one checkpoint is complete; the next writes are under way
        time.sleep(0.05 + 0.037 * attempt)
        process.send_signal(signal.SIGKILL)
        process.wait()
        w = read_checkpoint(path)["state_dict"]["w"]
        assert len(w) == 2_000_000 and torch.equal(w, torch.full_like(w, w[0].item()))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def fit_signalled_then_resumed(folder, sig, *args, ready, group=False, env=None):
    """Starts `cropyield fit` in a session of its own, sends ``sig`` (to its whole process group with
    ``group``) once ``ready(checkpoint)`` holds for its last.ckpt, checks the exit status, the one
    closing line and the checkpoint written, then resumes with `--ckpt_path last`."""
    command = [str(BIN / "cropyield"), "fit", *map(str, args)]
    env = {**os.environ, **(env or {})}
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)  # fmt: skip
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and ready(torch.load(last, weights_only=True)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be signalled"
    before = torch.load(last, weights_only=True)["global_step"]
    if group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=120)
        outlived = group_alive(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # nothing left behind if the test failed
    assert process.returncode == 128 + sig, (process.returncode, stderr)
    assert not outlived, "a process of the run outlived it"
    saved = torch.load(last, weights_only=True)
    closing = [line for line in stderr.splitlines() if line.startswith("cropyield: ")]
    assert closing == [
        f"cropyield: stopped by {sig.name}: saved {last} at step {saved['global_step']}; resume with --ckpt_path last"
    ], stderr
    assert saved["global_step"] >= before  # the step reached, not an older save
    result = run("cropyield", "fit", *args, "--ckpt_path", "last", cwd=folder, env=env)
    assert "Restored all states" in result.stdout and "not resumable" not in result.stdout + result.stderr
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_the_step_reached_and_resumes_exactly(tmp_path, sig):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12_000, 3, generator=g) * 100
    y = x @ torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.3, 0.6]]).T + torch.randn(12_000, 2, generator=g)
    header = ["temp", "rainfall", "humidity", "apples", "oranges"]
    for name in ("full", "signalled"):
        (tmp_path / name).mkdir()
        write_csv(tmp_path / name / "d.csv", header, torch.cat([x, y], 1).tolist())
    args = ["--data.data_path", "d.csv", "--data.fast_path_min_rows", "8", "--data.batch_size", "4",
            "--data.standardize", "true", "--model.lr", "0.01", "--checkpoint.every_n_train_steps", "64",
            "--trainer.max_epochs", "2"]  # fmt: skip
    run("cropyield", "fit", *args, cwd=tmp_path / "full")
    saved = fit_signalled_then_resumed(tmp_path / "signalled", sig, *args, ready=lambda c: c["global_step"] >= 640)
    assert 0 < saved["global_step"] % 3_000 and saved["global_step"] < 6_000  # in the middle of an epoch
    full = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert torch.equal(weights(tmp_path / "signalled" / "checkpoints" / "last.ckpt"), full)


@pytest.mark.slow
def test_sigterm_during_the_tutorial_run_stops_at_the_epochs_end_and_resumes_exactly(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "signalled").mkdir()
    args = ["--trainer.max_epochs", 400]
    run("cropyield", "fit", *args, cwd=tmp_path / "full")
    saved = fit_signalled_then_resumed(tmp_path / "signalled", signal.SIGTERM, *args, ready=lambda c: c["epoch"] >= 3)
    assert saved["global_step"] % 3 == 0 and saved["epoch"] < 399  # the plain DataLoader stops at an epoch's end
    full = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert torch.equal(weights(tmp_path / "signalled" / "checkpoints" / "last.ckpt"), full)


def crop_like_rows(folder, n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 100
    y = x @ torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.3, 0.6]]).T + torch.randn(n, 2, generator=g)
    write_csv(folder / "d.csv", ["temp", "rainfall", "humidity", "apples", "oranges"], torch.cat([x, y], 1).tolist())


# 6,000 rows, 4 a batch: 750 SGD steps an epoch on each of 2 processes, chunks of 64 (the fast path)
DDP_FIT = ["--data.data_path", "d.csv", "--data.fast_path_min_rows", "8", "--data.batch_size", "4",
           "--data.standardize", "true", "--model.lr", "0.01", "--checkpoint.every_n_train_steps", "64",
           "--trainer.max_epochs", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.callbacks+=tests.ddp_helpers.RecordRank"]  # fmt: skip
DDP_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT_DIR), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def uninterrupted_ddp_fit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    crop_like_rows(folder, 6_000)
    run("cropyield", "fit", *DDP_FIT, cwd=folder, env=DDP_ENV)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("group", [True, False], ids=["process_group", "launcher"])
def test_sigterm_to_a_ddp_fit_saves_the_step_reached_and_resumes_exactly(tmp_path, uninterrupted_ddp_fit, group):
    crop_like_rows(tmp_path, 6_000)
    saved = fit_signalled_then_resumed(tmp_path, signal.SIGTERM, *DDP_FIT, env=DDP_ENV, group=group,
                                       ready=lambda c: c["global_step"] >= 128)  # fmt: skip
    assert 0 < saved["global_step"] % 750 and saved["global_step"] < 1_500  # in the middle of an epoch
    full, resumed = (load_regressor(f / "checkpoints" / "last.ckpt") for f in (uninterrupted_ddp_fit, tmp_path))
    for name in ("linear.weight", "linear.bias", "feature_mean", "feature_std"):
        assert torch.equal(resumed.state_dict()[name], full.state_dict()[name]), name
    # Both processes of the resumed run end with those weights (DDP kept them in step).
    for rank in range(2):
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(weights["weight"], full.linear.weight) and torch.equal(weights["bias"], full.linear.bias)
