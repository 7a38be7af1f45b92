"""The walk-through scripts and the shipped fast config, run as a user would."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run

SCRIPTS = Path(__file__).parents[1] / "scripts"
FINAL = r"Final training MSE: ([\d.]+) \(least-squares optimum on the same rows: ([\d.]+)\)"


def script(name, *args, cwd):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_script_prints_the_tutorial_walk_through(tmp_path):
    out = script("train.py", cwd=tmp_path)
    assert re.findall(r"^Epoch \[(\d+)/100\], Loss: [\d.]+$", out, re.M) == [str(e) for e in range(10, 101, 10)]
    assert "Predictions beside targets" in out
    assert re.search(r"A new region \(temp 75, rainfall 63, humidity 44\): apples [\d.]+, oranges [\d.]+ tons", out)
    assert re.fullmatch(FINAL, out.strip().splitlines()[-1])
    assert (tmp_path / "checkpoints" / "train.ckpt").is_file()


def test_from_scratch_script_prints_the_loss_falling(tmp_path):
    out = script("from_scratch.py", cwd=tmp_path)
    before = float(re.search(r"Loss before training: ([\d.]+)", out)[1])
    one = float(re.search(r"Loss after one step: +([\d.]+)", out)[1])
    more = float(re.search(r"Loss after 100 more epochs: ([\d.]+)", out)[1])
    assert abs(before - 10183) < 5 and abs(one - 7437) < 5  # the tutorial's 10183.0049 and 7436.8960
    assert more < one < before
    assert re.fullmatch(FINAL, out.strip().splitlines()[-1])


@pytest.mark.slow
def test_fast_config_reaches_one_percent_of_the_optimum_in_50_epochs(tmp_path):
    result = run("cropyield", "fit", "--config", "fast.yaml", cwd=tmp_path)
    assert "Epoch [50/50]" in result.stdout
    final, optimum = map(float, re.search(FINAL, result.stdout).groups())
    assert final <= 1.01 * optimum
