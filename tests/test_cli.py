"""The console commands, driven in subprocesses as a user would (and in-process for --help)."""

import csv
import inspect
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from cropyield import (
    INPUTS,
    TARGETS,
    CropYieldDataModule,
    CropYieldRegressor,
    LeastSquaresRegressor,
    ManualSGDRegressor,
    load_regressor,
)
from cropyield.cli import cli_main

from .conftest import assert_one_line_error, run, write_csv
from .test_files import BAD_FILES
from .test_model import tutorial_from_scratch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tutorial run of `cropyield fit` with no arguments, shared by the tests below."""
    folder = tmp_path_factory.mktemp("fit")
    result = run("cropyield", "fit", cwd=folder)
    return folder, result


def test_fit_with_no_arguments_is_the_tutorial_run(trained):
    folder, result = trained
    lines = re.findall(r"^Epoch \[(\d+)/100\], Loss: \d+\.\d{4}$", result.stdout, flags=re.M)
    assert lines == [str(e) for e in range(10, 101, 10)]
    assert re.search(
        r"^Final training MSE: [\d.]+ \(least-squares optimum on the same rows: 0\.909\d\)$", result.stdout, re.M
    )
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert len(list((folder / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    config = yaml.safe_load(next((folder / "lightning_logs").glob("version_*/config.yaml")).read_text())
    assert config["seed_everything"] == 42 and config["trainer"]["max_epochs"] == 100
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr
    assert "it/s" not in result.stdout and "\r" not in result.stdout  # no progress bar for 3-batch epochs


def test_fit_equals_the_tutorial_loop_from_the_default_seed(trained):
    folder, _ = trained
    torch.manual_seed(42)
    reference = nn.Linear(3, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(INPUTS, TARGETS), 5, shuffle=True)
    opt = torch.optim.SGD(reference.parameters(), lr=1e-5)
    for _ in range(100):
        for xb, yb in loader:
            torch.nn.functional.mse_loss(reference(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    model = load_regressor(folder / "checkpoints" / "last.ckpt")
    assert torch.equal(model.linear.weight, reference.weight) and torch.equal(model.linear.bias, reference.bias)


def test_checkpoints_load_weights_only_and_hold_no_foreign_absolute_paths(trained):
    folder, _ = trained
    for path in (folder / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        without_callbacks = {k: v for k, v in checkpoint.items() if k != "callbacks"}
        assert str(folder) not in repr(without_callbacks)  # only ModelCheckpoint's own state names its folder


def test_predict_json_equals_the_in_process_model(trained):
    folder, _ = trained
    result = run(
        "cropyield-predict", "--ckpt", "checkpoints/last.ckpt", "75", "63", "44", "80", "70", "50", "--json", cwd=folder
    )
    model = load_regressor(folder / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        expected = model(torch.tensor([[75.0, 63.0, 44.0], [80.0, 70.0, 50.0]]))
    assert json.loads(result.stdout) == [{"apples": a, "oranges": o} for a, o in expected.tolist()]


def test_predict_prints_yields_with_units(trained):
    folder, _ = trained
    result = run("cropyield-predict", "--ckpt", "checkpoints/last.ckpt", "75", "63", "44", cwd=folder)
    assert re.fullmatch(
        r"temp=75, rainfall=63, humidity=44 -> apples \d+\.\d\d, oranges \d+\.\d\d \(tons per hectare\)\n",
        result.stdout,
    )


def test_predict_csv_to_out_csv(trained, tmp_path):
    folder, _ = trained
    rows = [[20, 75, 63, 44], [21, 80, 70, 50]]
    write_csv(tmp_path / "regions.csv", ["id", "temp", "rainfall", "humidity"], rows)
    out = tmp_path / "out.csv"
    run(
        "cropyield-predict",
        "--ckpt",
        folder / "checkpoints" / "last.ckpt",
        "--csv",
        tmp_path / "regions.csv",
        "--out",
        out,
        cwd=tmp_path,
    )
    lines = out.read_text().splitlines()
    assert lines[0] == "id,temp,rainfall,humidity,apples,oranges"  # every input column, then the predictions
    model = load_regressor(folder / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        expected = model(torch.tensor([r[1:] for r in rows], dtype=torch.float32))
    assert [line.split(",")[:4] for line in lines[1:]] == [[str(v) for v in r] for r in rows]
    assert torch.equal(torch.tensor([[float(v) for v in line.split(",")[4:]] for line in lines[1:]]), expected)


def test_lightningcli_predict_writes_a_csv(trained, tmp_path):
    folder, _ = trained
    out = tmp_path / "p.csv"
    run(
        "cropyield",
        "predict",
        "--ckpt_path",
        folder / "checkpoints" / "last.ckpt",
        "--prediction_writer.output_path",
        out,
        cwd=tmp_path,
    )
    lines = out.read_text().splitlines()
    assert lines[0] == "temp,rainfall,humidity,apples,oranges" and len(lines) == 16
    model = load_regressor(folder / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        expected = model(INPUTS)
    got = torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert torch.equal(got[:, 3:], expected)


def test_predict_reads_a_file_without_target_columns_and_the_other_stages_refuse_it(trained, tmp_path):
    folder, _ = trained
    ckpt = folder / "checkpoints" / "last.ckpt"
    rows = [[73, 67, 43], [91, 88, 64], [102, 43, 37]]
    write_csv(tmp_path / "regions.csv", ["temp", "rainfall", "humidity"], rows)
    out = tmp_path / "p.csv"
    run("cropyield", "predict", "--ckpt_path", ckpt, "--data.data_path", "regions.csv",
        "--prediction_writer.output_path", out, cwd=tmp_path)  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[0] == "temp,rainfall,humidity,apples,oranges" and len(lines) == 4
    got = torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]], dtype=torch.float64)
    assert got[:, :3].tolist() == rows
    torch.testing.assert_close(got[:, 3:], by_hand(ckpt, torch.tensor(rows)), rtol=2**-20, atol=0)
    for command in (["fit"], ["test", "--ckpt_path", ckpt]):
        result = run("cropyield", *command, "--data.data_path", "regions.csv", cwd=tmp_path, check_rc=None)
        assert_one_line_error(result, "regions.csv: missing column(s) ['apples', 'oranges']")
    assert not (tmp_path / "checkpoints").exists()
    for logs in ("lightning_logs", "tensorboard"):  # the predict run's log only (TensorBoard's if installed)
        assert [p.name for p in (tmp_path / logs).iterdir()] == ["version_0"] if (tmp_path / logs).exists() else True


def own_copy(trained, tmp_path):
    """The trained folder copied, for a test that writes in it (the fixture stays as the run left it)."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def test_running_again_keeps_the_earlier_runs_checkpoints_and_starts_a_new_log_version(trained, tmp_path):
    folder = own_copy(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "checkpoints").glob("*.ckpt")}
    result = run("cropyield", "fit", "--trainer.max_epochs", "2", cwd=folder)
    kept = folder / "checkpoints" / "version_0"
    assert f"cropyield: the earlier run's checkpoints (best-epoch099.ckpt, last.ckpt) are kept in {kept}/" in (
        result.stdout.splitlines()
    )
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the newest run's
    assert sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt")) == ["best-epoch001.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (folder / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert "not empty" not in result.stdout + result.stderr  # Lightning's warning: the move replaces it
    assert (folder / "lightning_logs" / "version_0" / "metrics.csv").read_bytes() == (
        trained[0] / "lightning_logs" / "version_0" / "metrics.csv"
    ).read_bytes()


def test_resuming_keeps_its_own_checkpoints_in_place(tmp_path):
    run("cropyield", "fit", "--trainer.max_epochs", "2", cwd=tmp_path)
    result = run("cropyield", "fit", "--trainer.max_epochs", "3", "--ckpt_path", "last", cwd=tmp_path)
    assert "kept in" not in result.stdout and not [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    assert "not empty" not in result.stdout + result.stderr


PLAIN_FIT = """
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from cropyield import CropYieldDataModule, CropYieldRegressor
trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[ModelCheckpoint(".")], accelerator="cpu")
trainer.fit(CropYieldRegressor(), CropYieldDataModule())
"""


def test_a_plain_trainer_still_warns_of_a_checkpoint_folder_that_is_not_empty(tmp_path):
    # Only the CLI moves an earlier run's checkpoints aside: elsewhere Lightning's warning stays.
    (tmp_path / "earlier.ckpt").write_bytes(b"an earlier run")
    result = subprocess.run([sys.executable, "-c", PLAIN_FIT], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert re.search(r"Checkpoint directory .* exists and is not empty", result.stderr), result.stderr


def logged(folder, key: str) -> dict[int, float]:
    """A metric of the run's CSV log, by epoch."""
    with open(folder / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        return {int(row["epoch"]): float(row[key]) for row in csv.DictReader(f) if row[key]}


def test_the_logged_epoch_loss_is_the_tutorial_loops(trained):
    torch.manual_seed(42)
    reference = nn.Linear(3, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(INPUTS, TARGETS), 5, shuffle=True)
    opt = torch.optim.SGD(reference.parameters(), lr=1e-5)
    expected = []
    for _ in range(100):
        total = 0.0
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(reference(xb), yb)
            total += loss.item() * len(xb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        expected.append(total / len(INPUTS))
    got = logged(trained[0], "train/loss")
    assert sorted(got) == list(range(100))
    assert [got[e] for e in range(100)] == pytest.approx(expected, rel=1e-6)


def test_the_best_checkpoint_is_the_epoch_of_the_lowest_val_mse(trained):
    folder, _ = trained
    val = logged(folder, "val/mse")
    best = min(val, key=val.get)
    (path,) = (folder / "checkpoints").glob("best-epoch*.ckpt")
    assert path.name == f"best-epoch{best:03d}.ckpt"
    assert torch.load(path, weights_only=True)["epoch"] == best
    model = load_regressor(path)
    with torch.no_grad():
        mse = float(((model(INPUTS).double() - TARGETS.double()) ** 2).mean())
    assert mse == pytest.approx(val[best], rel=1e-5)  # the value logged is the checkpoint's own


def test_manual_variant_through_its_config_equals_the_hand_written_loop(tmp_path):
    result = run("cropyield", "fit", "--config", "from_scratch.yaml", cwd=tmp_path)
    assert "Epoch [100/100]" in result.stdout
    model = load_regressor(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, ManualSGDRegressor)
    torch.manual_seed(42)
    initial = nn.Linear(3, 2)
    w, b = tutorial_from_scratch(initial.weight.detach(), initial.bias.detach())
    assert torch.equal(model.linear.weight, w) and torch.equal(model.linear.bias, b)


def test_model_flag_selects_the_manual_variant(tmp_path):
    run("cropyield", "fit", "--model", "ManualSGDRegressor", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert isinstance(load_regressor(tmp_path / "checkpoints" / "last.ckpt"), ManualSGDRegressor)


def test_resume_with_ckpt_path_last_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run("cropyield", "fit", "--trainer.max_epochs", "8", cwd=tmp_path / "a")
    run("cropyield", "fit", "--trainer.max_epochs", "3", cwd=tmp_path / "b")
    resumed = run("cropyield", "fit", "--trainer.max_epochs", "8", "--ckpt_path", "last", cwd=tmp_path / "b")
    assert "Restored all states" in resumed.stdout
    a = load_regressor(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = load_regressor(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)


def test_file_with_seven_features_and_three_targets_needs_no_model_flags(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 7, generator=g)
    y = x @ torch.rand(7, 3, generator=g) + 1
    header = [f"x{i}" for i in range(7)] + ["t0", "t1", "t2"]
    write_csv(tmp_path / "d.csv", header, torch.cat([x, y], 1).tolist())
    run(
        "cropyield",
        "fit",
        "--data.data_path",
        "d.csv",
        "--data.target_names",
        "[t0, t1, t2]",
        "--trainer.max_epochs",
        "2",
        cwd=tmp_path,
    )
    model = load_regressor(tmp_path / "checkpoints" / "last.ckpt")
    assert model.linear.weight.shape == (3, 7)
    assert model.hparams.feature_names == header[:7] and model.hparams.target_names == ["t0", "t1", "t2"]
    result = run("cropyield-predict", "--ckpt", "checkpoints/last.ckpt", *range(7), "--json", cwd=tmp_path)
    assert list(json.loads(result.stdout)[0]) == ["t0", "t1", "t2"]
    # The LightningCLI route takes the columns from the checkpoint: no --data.target_names needed.
    run("cropyield", "predict", "--ckpt_path", "checkpoints/last.ckpt", "--data.data_path", "d.csv", cwd=tmp_path)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == ",".join(header)
    got = torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]])
    torch.testing.assert_close(got[:, 7:], by_hand(tmp_path / "checkpoints" / "last.ckpt", x).float())
    # A model that does not fit the data: one line naming both column lists, nothing written.
    (tmp_path / "predictions.csv").unlink()
    result = run("cropyield", "predict", "--ckpt_path", "checkpoints/last.ckpt", cwd=tmp_path, check_rc=None)
    # Prediction needs the features only: those are what is named missing, not the targets.
    assert_one_line_error(result, "missing column(s) ['x0', 'x1', 'x2', 'x3', 'x4', 'x5', 'x6']", "'temp', 'rainfall'")
    assert not (tmp_path / "predictions.csv").exists()


# --- a checkpoint rebuilds its whole model ------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Checkpoints of the standardized SGD config and of the exact solver, one fit each."""
    folders = {}
    for name in ("fast.yaml", "exact.yaml"):
        folders[name] = tmp_path_factory.mktemp(name.split(".")[0])
        run("cropyield", "fit", "--config", name, cwd=folders[name])
    return {name: folder / "checkpoints" / "last.ckpt" for name, folder in folders.items()}


def by_hand(ckpt, x):
    """The prediction a checkpoint's weights and scaler give, computed here from its tensors."""
    saved = torch.load(ckpt, weights_only=True)
    state, hparams = saved["state_dict"], saved["hyper_parameters"]
    x = x.double()
    if hparams["standardize"]:
        x = (x - state["feature_mean"].double()) / state["feature_std"].double()
    return x @ state["linear.weight"].double().T + state["linear.bias"].double()


def reported(stdout: str, key: str) -> float:
    return float(re.search(rf"^\s*{re.escape(key)}\s+([-\d.e]+)\s*$", stdout, re.M)[1])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fast.yaml", "exact.yaml"])
def test_predict_test_validate_rebuild_the_model_the_checkpoint_holds(variants, tmp_path, config):
    ckpt = variants[config]
    run("cropyield", "predict", "--ckpt_path", ckpt, cwd=tmp_path)  # no --config: all from the checkpoint
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    got = torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]], dtype=torch.float64)
    expected = by_hand(ckpt, INPUTS)
    torch.testing.assert_close(got[:, 3:], expected, rtol=1e-6, atol=1e-4)
    if config == "fast.yaml":  # the standardized model: 57.32 for the first row, not 1794 of a raw one
        assert round(got[0, 3].item(), 2) == 57.32
    mse = float(((expected - TARGETS.double()) ** 2).mean())
    for command, key in (("test", "test/mse"), ("validate", "val/mse")):
        result = run("cropyield", command, "--ckpt_path", ckpt, cwd=tmp_path)
        assert reported(result.stdout, key) == pytest.approx(mse, rel=1e-5)
    assert not (tmp_path / "checkpoints").exists()  # evaluating writes no checkpoint


@pytest.mark.parametrize(
    ("config", "args", "fragments"),
    [
        ("fast.yaml", ["--data.standardize", "false"], ["--data.standardize false (saved: true)"]),
        ("fast.yaml", ["--config", "exact.yaml"], ["--model LeastSquaresRegressor", "CropYieldRegressor"]),
        ("exact.yaml", ["--model.lr", "0.1"], ["--model.lr (a LeastSquaresRegressor has no lr)"]),
        ("fast.yaml", ["--data.feature_names", "[temp, rainfall]"], ["feature_names [temp, rainfall]"]),
    ],
)
def test_an_argument_contradicting_the_checkpoint_is_one_line_exit_2(variants, tmp_path, config, args, fragments):
    result = run("cropyield", "predict", "--ckpt_path", variants[config], *args, cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield: error:", str(variants[config]), *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_checkpoints_own_config_agrees_with_it(variants, tmp_path):
    result = run("cropyield", "test", "--config", "fast.yaml", "--ckpt_path", variants["fast.yaml"], cwd=tmp_path)
    expected = by_hand(variants["fast.yaml"], INPUTS)
    assert reported(result.stdout, "test/mse") == pytest.approx(float(((expected - TARGETS) ** 2).mean()), rel=1e-5)


def test_a_long_epoch_shows_a_bar_counting_batches_and_metrics_count_optimizer_steps(tmp_path, capsys):
    import lightning as L

    from cropyield.callbacks import LongWorkProgressBar

    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, generator=g)
    dm = CropYieldDataModule.from_tensors(x, x @ torch.ones(3, 2), batch_size=4, fast_path_min_rows=8, steps_per_call=8)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[LongWorkProgressBar(delay=0)],  # the model adds RealSteps
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )
    trainer.fit(CropYieldRegressor(lr=0.1), dm)
    out = capsys.readouterr().out
    assert "Epoch 1: 100%" in out and "100/100 [" in out and "rows/s=" in out  # 100 batches, in 13 calls
    assert trainer.global_step == 200
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        steps = {int(row["epoch"]): int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert steps == {0: 99, 1: 199}  # as the tutorial's run logs step 2 for its 3-step epoch 0


def test_a_long_streamed_statistics_pass_shows_a_bar_and_a_short_one_prints_nothing(tmp_path, capsys):
    import lightning as L

    from cropyield.callbacks import LongWorkProgressBar, ProgressReport

    g = torch.Generator().manual_seed(0)
    (tmp_path / "d").mkdir()
    for i in range(4):  # a piece a file
        x = torch.rand(300, 3, generator=g) * 100
        write_csv(
            tmp_path / "d" / f"p{i}.csv",
            ["temp", "rainfall", "humidity", "apples", "oranges"],
            torch.cat([x, x @ torch.ones(3, 2)], 1).tolist(),
        )
    for delay in (0, 3):  # 3 s: the CLI's; this pass takes milliseconds
        dm = CropYieldDataModule(data_path=tmp_path / "d", streaming=True, standardize=True, batch_size=50)
        bars = [LongWorkProgressBar(delay=delay), ProgressReport()]
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=bars)  # fmt: skip
        trainer.fit(CropYieldRegressor(standardize=True, lr=0.01), dm)
        out = capsys.readouterr().out
        if delay == 0:  # one pass (setup's, for standardize; the closing report reuses it)
            assert re.search(r"Statistics pass: 100%\|\| 4/4 \[[^]]*, rows/s=[\d,]+\]", out.replace("█", "")), out
            assert out.count("Statistics pass:   0%") == 1  # one bar started
        else:
            assert "Statistics pass" not in out and "Final training MSE" in out


@pytest.fixture
def argv(monkeypatch):
    """In-process CLI calls: sys.argv holds only the program, as under the console script."""
    monkeypatch.setattr(sys, "argv", ["cropyield"])


def documented(cls, name: str) -> str:
    """The first words of an argument's description in a Google-style docstring."""
    return " ".join(cls.__doc__.split(f"    {name}:")[1].split("\n")[0].split()[:4])


def test_help_documents_every_argument(argv, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in inspect.signature(CropYieldDataModule).parameters:
        assert f"--data.{name}" in text and documented(CropYieldDataModule, name) in text, name
    assert "--model" in text and "--checkpoint.monitor" in text and "--report.every_n_epochs" in text
    assert re.search(
        r"--trainer\.enable_progress_bar .*?Default: ``True``\. \(type: Optional\[bool\], default: True\)", text
    )
    for cls in (CropYieldRegressor, ManualSGDRegressor, LeastSquaresRegressor):
        with pytest.raises(SystemExit):
            cli_main(["fit", "--model.help", cls.__name__])
        text = " ".join(capsys.readouterr().out.split())
        for name in inspect.signature(cls).parameters:
            assert f"--model.{name}" in text and documented(cls, name) in text, name


def test_print_config_then_config_reproduces_the_runs_weights(argv, tmp_path, capsys):
    flags = ["--model.lr", "2e-05", "--data.batch_size", "3", "--trainer.max_epochs", "4"]
    with pytest.raises(SystemExit):
        cli_main(["fit", *flags, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["lr"] == 2e-05 and config["data"]["batch_size"] == 3
    (tmp_path / "flags").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    run("cropyield", "fit", *flags, cwd=tmp_path / "flags")
    run("cropyield", "fit", "--config", "config.yaml", cwd=tmp_path / "config")
    a = load_regressor(tmp_path / "flags" / "checkpoints" / "last.ckpt")
    b = load_regressor(tmp_path / "config" / "checkpoints" / "last.ckpt")
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert torch.load(tmp_path / "config" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4 * 5
    saved = yaml.safe_load(next((tmp_path / "config" / "lightning_logs").glob("version_*/config.yaml")).read_text())
    assert saved["data"]["batch_size"] == 3


def test_shipped_configs_build(argv, tmp_path):
    for name in ("tutorial.yaml", "from_scratch.yaml"):
        cli = cli_main(["--config", name, f"--trainer.default_root_dir={tmp_path}"], run=False)
        assert cli.trainer.max_epochs == 100
    assert cli.datamodule.limit_rows == 5 and not cli.datamodule.shuffle
    cli = cli_main(["--config", "exact.yaml", f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, LeastSquaresRegressor) and cli.trainer.max_epochs == 1


def test_exact_config_prints_the_optimum_reached_and_r2(tmp_path):
    result = run("cropyield", "fit", "--config", "exact.yaml", cwd=tmp_path)
    lines = result.stdout.strip().splitlines()
    at = lines.index("Final training MSE: 0.9094 (least-squares optimum on the same rows: 0.9094)")
    assert re.fullmatch(r"Training R²: apples 0\.99\d\d, oranges 0\.99\d\d", lines[at - 1]), lines[at - 1]
    # Then the statistics table of each target (its numbers are checked against statsmodels in test_exact.py).
    table = "\n".join(lines[at + 1 :])
    assert table.count("OLS Regression Results") == 2 and "Dep. Variable:                 oranges" in table
    assert re.search(r"^rainfall +0\.8423 ", table, re.M) and lines[-1].startswith("The condition number is large")
    assert not result.stderr.strip(), result.stderr
    model = load_regressor(tmp_path / "checkpoints" / "last.ckpt")
    design = torch.cat([INPUTS.double(), torch.ones(15, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, TARGETS.double(), driver="gelsd").solution
    torch.testing.assert_close(model.linear.weight.double(), solution[:3].T, rtol=1e-5, atol=1e-6)
    predicted = run("cropyield-predict", "--ckpt", "checkpoints/last.ckpt", "75", "63", "44", "--json", cwd=tmp_path)
    expected = (torch.tensor([75.0, 63.0, 44.0, 1.0], dtype=torch.float64) @ solution).tolist()
    got = json.loads(predicted.stdout)[0]
    assert abs(got["apples"] - expected[0]) < 1e-3 and abs(got["oranges"] - expected[1]) < 1e-3


def test_exact_config_on_a_duplicated_column_warns_in_one_line(tmp_path):
    rows = [[*x, x[0], *y] for x, y in zip(INPUTS.tolist(), TARGETS.tolist(), strict=True)]
    write_csv(tmp_path / "d.csv", ["temp", "rainfall", "humidity", "temp_again", "apples", "oranges"], rows)
    result = run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", "d.csv", cwd=tmp_path)
    assert result.stderr.strip().splitlines() == [
        "cropyield: warning: the data is singular (collinear column(s) ['temp', 'temp_again']); using the "
        "minimum-norm least-squares solution"
    ]
    assert "(least-squares optimum on the same rows: 0.9094)" in result.stdout


# --- errors: one line on stderr, exit code 2, no traceback, nothing touched ---------------------


@pytest.fixture
def old_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"previous run")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", [*sorted(BAD_FILES), "missing", "directory", "too_few_rows_for_split"])
def test_fit_on_bad_data_is_one_line_exit_2_and_touches_no_checkpoint(tmp_path, old_checkpoint, case):
    extra = []
    if case in BAD_FILES:
        (tmp_path / "d.csv").write_bytes(BAD_FILES[case][0])
        fragments = ["d.csv", *BAD_FILES[case][1]]
        if case == "missing_column":  # named features: by default every non-target column is one
            extra = ["--data.feature_names", "[temp, rainfall, humidity]"]
    elif case == "missing":
        fragments = ["d.csv", "no such file"]
    elif case == "directory":
        (tmp_path / "d.csv").mkdir()
        fragments = ["d.csv", "is a directory"]
    else:
        (tmp_path / "d.csv").write_text("temp,rainfall,humidity,apples,oranges\n1,2,3,4,5\n2,3,4,5,6\n3,4,5,6,7\n")
        extra, fragments = ["--data.val_fraction", "0.5"], ["d.csv", "too few"]
    result = run("cropyield", "fit", "--data.data_path", "d.csv", *extra, cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield: error:", *fragments)
    assert [p.name for p in old_checkpoint.iterdir()] == ["last.ckpt"]
    assert (old_checkpoint / "last.ckpt").read_bytes() == b"previous run"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model.lr", "-1"], "lr must be positive, got -1.0"),
        (["--data.batch_size", "0"], "batch_size must be at least 1, got 0"),
        (["--data.val_fraction", "2"], "val_fraction must be in [0, 1), got 2.0"),
        (["--data.batch_size", "zero"], "--data.batch_size: invalid value 'zero' (expected an integer)"),
        (["--trainer.max_epochs", "-3"], "--trainer.max_epochs: `max_epochs` must be a non-negative integer"),
        (["--trainer.devices", "0"], "--trainer.devices: "),
        (["--model", "Nope"], "--model: invalid value 'Nope'"),
    ],
)
def test_fit_with_bad_arguments_is_one_line_exit_2(tmp_path, args, fragment):
    result = run("cropyield", "fit", *args, cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield: error:", fragment)
    assert not (tmp_path / "checkpoints").exists()


def test_bare_column_names_are_one_item_lists(argv, tmp_path):
    args = [
        "--data.target_names",
        "apples",
        "--data.feature_names=temp,rainfall",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = cli_main(args, run=False)
    assert cli.datamodule.target_names == ("apples",) and cli.datamodule.feature_names == ("temp", "rainfall")
    assert cli.model.linear.weight.shape == (1, 2) and cli.model.hparams.target_names == ["apples"]


def test_a_checkpoint_whose_weights_contradict_its_sizes_is_one_line_for_every_route(bad_checkpoints):
    for command in ("fit", "predict", "test"):
        result = run("cropyield", command, "--ckpt_path", "shape.ckpt", cwd=bad_checkpoints, check_rc=None)
        assert_one_line_error(result, "shape.ckpt: linear.weight has shape (2, 5), but its hyper-parameters say (2, 3)")
    assert not (bad_checkpoints / "lightning_logs").exists() and not (bad_checkpoints / "predictions.csv").exists()


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("bad")
    good = (trained[0] / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (folder / "text.ckpt").write_text("not a checkpoint")
    (folder / "dir.ckpt").mkdir()
    checkpoint = torch.load(trained[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["linear.weight"] = torch.zeros(2, 5)
    torch.save(checkpoint, folder / "shape.ckpt")
    checkpoint["state_dict"]["linear.weight"] = torch.zeros(2, 3)
    checkpoint["hyper_parameters"]["payload"] = __import__("tests.test_inference", fromlist=["x"]).CreatesFile(
        folder / "pwned"
    )
    torch.save(checkpoint, folder / "evil.ckpt")
    return folder


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--ckpt", "nope.ckpt", "1", "2", "3"], ["nope.ckpt", "no such checkpoint"]),
        (["--ckpt", "dir.ckpt", "1", "2", "3"], ["dir.ckpt", "is a directory"]),
        (["--ckpt", "text.ckpt", "1", "2", "3"], ["text.ckpt", "not a PyTorch checkpoint"]),
        (["--ckpt", "truncated.ckpt", "1", "2", "3"], ["truncated.ckpt"]),
        (["--ckpt", "shape.ckpt", "1", "2", "3"], ["shape.ckpt", "shape (2, 5)"]),
        (["--ckpt", "evil.ckpt", "1", "2", "3"], ["evil.ckpt", "refused"]),
        (["--ckpt", "GOOD", "1", "2"], ["groups of 3 values", "got 2"]),
        (["--ckpt", "GOOD", "1", "x", "3"], ["value 2", "'x'", "not a number"]),
        (["--ckpt", "GOOD", "1", "nan", "3"], ["value 2", "not a finite number"]),
        (["--ckpt", "GOOD", "1", "2", "inf"], ["value 3", "not a finite number"]),
    ],
)
def test_predict_errors_are_one_line_exit_2(bad_checkpoints, trained, args, fragments):
    args = [str(trained[0] / "checkpoints" / "last.ckpt") if a == "GOOD" else a for a in args]
    result = run("cropyield-predict", *args, cwd=bad_checkpoints, check_rc=None)
    assert_one_line_error(result, "cropyield-predict: error:", *fragments)
    assert not (bad_checkpoints / "pwned").exists()


def test_lightning_routes_refuse_a_payload_checkpoint(bad_checkpoints):
    for command in (["fit", "--ckpt_path", "evil.ckpt"], ["predict", "--ckpt_path", "evil.ckpt"]):
        result = run("cropyield", *command, cwd=bad_checkpoints, check_rc=None)
        assert_one_line_error(result, "evil.ckpt", "refused")
    assert not (bad_checkpoints / "pwned").exists()
