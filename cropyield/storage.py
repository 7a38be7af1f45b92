"""Where data lives: a local path, or the URL of an object store or cluster filesystem.

``s3://bucket/key`` (and ``gs://``, ``abfs://``, ``hdfs://``, where pyarrow was built with them)
is read through ``pyarrow.fs``: a file is opened for random access, so a Parquet row group or a
block of CSV lines is one ranged read, and nothing is copied to local disk. Credentials, region and
endpoint come from each system's standard configuration (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or a profile, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for an S3-compatible server), never from cropyield's own options.

Transient errors (a dropped connection, a server briefly unreachable) are retried: by pyarrow's AWS
retry strategy per request, and around each whole read (a header, a piece, a file) by
:func:`retried`, with growing pauses, for up to ``CROPYIELD_RETRY_SECONDS`` seconds (default 60);
checkpoint uploads (:mod:`cropyield.checkpoint_io`) go through the same loop. A lasting one is a
one-line :class:`~cropyield.errors.CropYieldError` naming the URL. The plain operations
(:func:`open_binary`, :func:`size`, :func:`read_range`) raise the OSError as it is, so a caller
retries its whole read, not one request inside it.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cropyield.errors import CropYieldError

T = TypeVar("T")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_RETRY_SECONDS = 60.0


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def location(path: str | os.PathLike) -> str | Path:
    """A URL as it is (``Path`` would fold ``s3://b`` into ``s3:/b``), anything else as a ``Path``."""
    return path if is_url(path) else Path(path)


def suffix(path: str | Path) -> str:
    """The lower-cased extension of a path or URL (``.csv``, ``.parquet``)."""
    return posixpath.splitext(str(path).rstrip("/"))[1].lower() if is_url(path) else Path(path).suffix.lower()


def name(path: str | Path) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else Path(path).name


def retry_seconds() -> float:
    """How long a failing read or write of a URL is retried before it is reported (``CROPYIELD_RETRY_SECONDS``)."""
    try:
        return max(0.0, float(os.environ.get("CROPYIELD_RETRY_SECONDS", _RETRY_SECONDS)))
    except ValueError:
        raise CropYieldError(
            f"CROPYIELD_RETRY_SECONDS={os.environ['CROPYIELD_RETRY_SECONDS']!r} is not a number of seconds"
        ) from None


def retried(
    url: str,
    action: Callable[[], T],
    *,
    retry_if: Callable[[BaseException], bool] | None = None,
    failure: str = "cannot be reached",
    kept: str = "",
) -> T:
    """``action()``, retried with pauses of 0.25 s doubling to 4 s, for up to ``retry_seconds()``,
    while its error is one worth retrying; other errors pass through as they are.

    Args:
        url: what is being read or written, named in the error.
        action: the whole read or write, done again from its start on each try.
        retry_if: which errors are worth retrying (default: :func:`transient`, the network's).
        failure: what could not be done, for the error (``cannot be reached``).
        kept: said after the error, once the time is spent (``, the previous one is kept``).

    Raises:
        CropYieldError: ``<url>: <failure> (<the last error, shortened>); retried for <n> s<kept>``.
    """
    retry_if = retry_if or (lambda err: transient(url, err))
    deadline, pause = time.monotonic() + retry_seconds(), 0.25
    while True:
        try:
            return action()
        except Exception as err:  # pyarrow's network errors are OSErrors; s3fs and botocore have their own
            if not retry_if(err):
                raise
            if time.monotonic() + pause > deadline:
                raise CropYieldError(
                    f"{url}: {failure} ({_brief(err)}); retried for {retry_seconds():g} s{kept}"
                ) from None
        time.sleep(pause)
        pause = min(4.0, 2 * pause)


def _brief(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, authority: str, endpoint: str | None, region: str | None):
    """One pyarrow filesystem per (scheme, bucket or host, endpoint, region): region lookups and
    connections are reused."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise CropYieldError(
            f"{scheme}://{authority}: reading URLs needs pyarrow; install it with: pip install 'cropyield[cloud]'"
        ) from None
    if scheme == "s3":
        if region is None and endpoint is None:
            try:
                region = pafs.resolve_s3_region(authority)
            except OSError:
                region = None  # the AWS configuration's (profile) region, or the SDK's default
        return pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=region,
            connect_timeout=5,
            request_timeout=30,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{authority}/")[0]
    except (OSError, ValueError) as err:
        hint = {"gs": "gcs", "gcs": "gcs", "abfs": "azure", "abfss": "azure", "hdfs": "hdfs"}.get(scheme)
        extra = f"; this pyarrow lacks {hint} support (install a pyarrow built with it)" if hint else ""
        raise CropYieldError(f"{scheme}://{authority}: no filesystem for this URL ({_brief(err)}){extra}") from None


def _resolve(url: str):
    """The filesystem of a URL and the path within it (``bucket/key``; ``/key`` on HDFS)."""
    scheme, rest = url.split("://", 1)
    authority, _, key = rest.partition("/")
    if scheme.lower() == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    else:
        endpoint = region = None
    fs = _filesystem(scheme.lower(), authority, endpoint, region)
    return fs, "/" + key.rstrip("/") if scheme.lower() in ("hdfs", "viewfs") else rest.rstrip("/")


_TRANSIENT = re.compile(
    r"AWS Error|curl|connect|timed? ?out|timeout|broken pipe|reset by peer|unreachable|SLOW_DOWN|throttl|"
    r"HTTP status 5\d\d|InternalError|ServiceUnavailable",
    re.IGNORECASE,
)


def transient(path: str | Path, err: BaseException) -> bool:
    """Whether an error reading ``path`` is the network's (worth retrying), not the file's content."""
    return is_url(path) and isinstance(err, OSError) and bool(_TRANSIENT.search(str(err)))


def kind(path: str | Path) -> str:
    """``file``, ``dir`` or ``missing``."""
    if not is_url(path):
        path = Path(path)
        return "dir" if path.is_dir() else "file" if path.exists() else "missing"
    import pyarrow.fs as pafs

    fs, key = _resolve(path)
    info = retried(path, lambda: fs.get_file_info(key))
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "missing")


def list_files(folder: str | Path) -> list[str | Path]:
    """The files directly in a folder (not in its sub-folders), in sorted name order."""
    if not is_url(folder):
        return sorted(p for p in Path(folder).iterdir() if p.is_file())
    import pyarrow.fs as pafs

    fs, key = _resolve(folder)
    infos = retried(folder, lambda: fs.get_file_info(pafs.FileSelector(key)))
    base = folder.rstrip("/")
    return sorted(f"{base}/{info.base_name}" for info in infos if info.type == pafs.FileType.File)


def open_binary(path: str | Path) -> io.RawIOBase | io.BufferedIOBase:
    """A file opened for reading bytes, with random access (``seek``; ranged reads for a URL)."""
    if not is_url(path):
        return open(path, "rb")
    fs, key = _resolve(path)
    return fs.open_input_file(key)


def open_text(path: str | Path) -> io.TextIOBase:
    """A UTF-8 text file (a leading BOM skipped), lines as written (``newline=""``), for ``csv``."""
    if not is_url(path):
        return open(path, newline="", encoding="utf-8-sig")
    return io.TextIOWrapper(io.BufferedReader(open_binary(path)), newline="", encoding="utf-8-sig")


def size(path: str | Path) -> int:
    """The size of a file in bytes."""
    if not is_url(path):
        return os.path.getsize(path)
    fs, key = _resolve(path)
    return fs.get_file_info(key).size


def read_range(path: str | Path, start: int, stop: int) -> bytes:
    """The bytes ``[start, stop)`` of a file: one ranged read for a URL."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    fs, key = _resolve(path)
    with fs.open_input_file(key) as f:
        return f.read_at(stop - start, start)
