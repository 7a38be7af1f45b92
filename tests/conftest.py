"""Shared fixtures: quiet Trainer settings, the tutorial's rows as files, subprocess helpers, and a
local S3-compatible server (moto's server mode on 127.0.0.1) for the tests of URLs."""

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cropyield.data import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS

BIN = Path(sys.executable).parent
ROOT_DIR = Path(__file__).parents[1]


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


# --- a local S3 server: every process of a test (subprocesses too) reaches it through the AWS_* variables


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(port: int | None = None):
    """moto's S3 server on 127.0.0.1 (its state lives in this process: a restart on the same port keeps it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port or free_port(), verbose=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A session's S3 server, with ``AWS_ENDPOINT_URL`` and test credentials set in ``os.environ``
    (so ``run`` passes them to every subprocess), restored when the session ends."""
    with moto_server() as server:
        host, port = server.get_host_and_port()
        names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        saved = {name: os.environ.get(name) for name in (*names, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")}
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(dict(zip(names, (f"http://{host}:{port}", "testing", "testing", "us-east-1"), strict=True)))
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_buckets = itertools.count()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server: ``s3://test-<n>``."""
    import pyarrow.fs as pafs

    name = f"test-{os.getpid()}-{next(_buckets)}"
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def s3_filesystem(endpoint: str | None = None):
    """A pyarrow filesystem on the test S3 server (``bucket/key`` paths), or on ``endpoint``."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=endpoint or os.environ["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing"
    )


def upload(local: Path, url: str, endpoint: str | None = None) -> str:
    """Copies a local file (or every file of a folder) to ``url`` (``s3://bucket/key``); returns the URL."""
    fs = s3_filesystem(endpoint)
    sources = sorted(local.iterdir()) if local.is_dir() else [local]
    for source in sources:
        key = url.removeprefix("s3://").rstrip("/") + ("/" + source.name if local.is_dir() else "")
        with fs.open_output_stream(key) as out:
            out.write(source.read_bytes())
    return url
