"""The report picture and the logs it reads."""

import struct
import sys

import pytest

from cropyield.cli import _default_loggers
from cropyield.report import main

from .conftest import assert_one_line_error, run


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run("cropyield", "fit", "--trainer.max_epochs", "12", cwd=folder)
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


def test_report_errors_are_one_line(fitted, tmp_path):
    result = run("cropyield-report", "--log-dir", tmp_path, "--ckpt", "x.ckpt", cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield-report: error:", "no metrics.csv")


def test_report_without_matplotlib_says_how_to_install(fitted, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as info:
        main(["--log-dir", str(fitted), "--ckpt", str(fitted / "checkpoints" / "last.ckpt"), "--out", "x.png"])
    assert info.value.code == 2
    assert "pip install 'cropyield[report]'" in capsys.readouterr().err


def test_report_of_an_exact_fit(tmp_path):
    run("cropyield", "fit", "--config", "exact.yaml", cwd=tmp_path)
    run("cropyield-report", "--log-dir", ".", "--ckpt", "checkpoints/last.ckpt", "--out", "r.png", cwd=tmp_path)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
