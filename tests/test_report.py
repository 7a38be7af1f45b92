"""The report picture and the logs it reads."""

import csv
import struct
import sys

import numpy as np
import pytest
import torch

from cropyield import INPUTS, TARGETS
from cropyield.cli import _default_loggers
from cropyield.report import draw, find_run, main

from .conftest import assert_one_line_error, run
from .test_routes import reference


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run("cropyield", "fit", "--trainer.max_epochs", "12", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def exact_fit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exact")
    run("cropyield", "fit", "--config", "exact.yaml", cwd=folder)
    return folder


def test_fit_logs_to_csv_and_to_tensorboard_when_installed(fitted, monkeypatch):
    assert (fitted / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert list((fitted / "tensorboard").glob("version_0/events.out.tfevents.*"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert [type(logger).__name__ for logger in _default_loggers(str(fitted))] == ["CSVLogger"]


@pytest.mark.parametrize("log_dir", [".", "lightning_logs/version_0"])
def test_report_draws_a_png_of_sensible_size(fitted, log_dir):
    result = run(
        "cropyield-report", "--log-dir", log_dir, "--ckpt", "checkpoints/last.ckpt", "--out", "r.png", cwd=fitted
    )
    assert "wrote r.png" in result.stdout
    width, height = png_size(fitted / "r.png")
    assert (width, height) == (1350, 420)  # three panels of 4.5 x 4.2 inches at 100 dpi
    assert (fitted / "r.png").stat().st_size > 20_000  # lines, points and text, not an empty canvas


def drawn_figure(run_folder, ckpt, monkeypatch, tmp_path):
    """The figure ``draw`` makes for a run, kept open to read what it plots."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw(find_run(run_folder), ckpt, tmp_path / "r.png")
    return figures[0]


def logged_losses(run_folder) -> tuple[list[int], list[float]]:
    """The epoch losses the run logged, read here from its metrics.csv (epochs counted from 1)."""
    with open(run_folder / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss"]]
    return [int(row["epoch"]) + 1 for row in rows], [float(row["train/loss"]) for row in rows]


@pytest.mark.parametrize("config", ["tutorial", "exact"])
def test_report_plots_the_logged_losses_and_the_checkpoints_predictions(
    fitted, exact_fit, config, monkeypatch, tmp_path
):
    folder = fitted if config == "tutorial" else exact_fit
    ckpt = folder / "checkpoints" / "last.ckpt"
    loss_axes, *target_axes = drawn_figure(folder, ckpt, monkeypatch, tmp_path).axes
    (line,) = loss_axes.get_lines()
    epochs, losses = logged_losses(folder)
    assert epochs == list(range(1, 13 if config == "tutorial" else 2))
    assert line.get_xdata().tolist() == epochs and line.get_ydata().tolist() == losses
    # One panel per target: the tutorial's 15 rows (its validation rows), actual vs the prediction
    # the checkpoint's tensors give, computed here in float64.
    expected, bound = reference(ckpt, INPUTS)
    assert [ax.get_xlabel() for ax in target_axes] == ["actual apples", "actual oranges"]
    for j, ax in enumerate(target_axes):
        (points,) = ax.collections
        actual, predicted = torch.from_numpy(np.asarray(points.get_offsets(), dtype=np.float64)).T
        assert torch.equal(actual, TARGETS[:, j].double())
        assert ((predicted - expected[:, j]).abs() <= bound[:, j]).all()
        mse = float(((expected[:, j] - TARGETS[:, j].double()) ** 2).mean())
        assert ax.get_title() == f"{('apples', 'oranges')[j]}: MSE {mse:.2f}"


def test_report_errors_are_one_line(fitted, tmp_path):
    result = run("cropyield-report", "--log-dir", tmp_path, "--ckpt", "x.ckpt", cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield-report: error:", "no metrics.csv")


def test_report_without_matplotlib_says_how_to_install(fitted, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as info:
        main(["--log-dir", str(fitted), "--ckpt", str(fitted / "checkpoints" / "last.ckpt"), "--out", "x.png"])
    assert info.value.code == 2
    assert "pip install 'cropyield[report]'" in capsys.readouterr().err


def test_report_of_an_exact_fit(exact_fit):
    run("cropyield-report", "--log-dir", ".", "--ckpt", "checkpoints/last.ckpt", "--out", "r.png", cwd=exact_fit)
    assert png_size(exact_fit / "r.png") == (1350, 420)
