"""Faults injected into real runs: divergence, SIGKILL and resume, kills during checkpoint writes."""

import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from cropyield import CropYieldDataModule, CropYieldRegressor, load_regressor
from cropyield.errors import TrainingDivergedError

from .conftest import BIN, run


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
from cropyield.callbacks import AtomicCheckpointIO
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
