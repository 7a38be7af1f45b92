"""Shared fixtures: quiet Trainer settings, the tutorial's rows as files, and subprocess helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cropyield.data import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS

BIN = Path(sys.executable).parent


@pytest.fixture
def quiet():
    """Trainer keyword arguments for tests: no logger, checkpoints, progress bar or summary."""
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }


def write_csv(path: Path, header, rows) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


@pytest.fixture
def tutorial_csv(tmp_path) -> Path:
    """The tutorial's 15 rows as a CSV file with its column names."""
    rows = [[int(v) for v in x + y] for x, y in zip(INPUTS.tolist(), TARGETS.tolist(), strict=True)]
    return write_csv(tmp_path / "tutorial.csv", (*FEATURE_NAMES, *TARGET_NAMES), rows)


def run(
    command: str, *args, cwd: Path, check_rc: int | None = 0, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs one of the package's console commands as a user would, in ``cwd`` (``env`` adds variables)."""
    env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [str(BIN / command), *map(str, args)],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check_rc is not None:
        assert result.returncode == check_rc, (
            f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr containing every fragment, and no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
