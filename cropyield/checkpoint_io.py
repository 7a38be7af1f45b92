"""Checkpoint writes that a crash cannot leave half-done (local files and object storage), and safe reads."""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from cropyield import storage
from cropyield.errors import CropYieldError
from cropyield.inference import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a crash cannot leave half-done, and integrity-checked, safe reads.

    Lightning writes through an fsspec transaction (a temporary file, then a move) without fsync,
    so a power loss can leave a renamed but empty file. Here the bytes go to a temporary file in
    the same folder, are flushed and fsynced, then ``os.replace`` swaps it in and the folder is
    fsynced. Reads go through :func:`cropyield.inference.read_checkpoint`: CRC-checked,
    ``weights_only=True``.

    On object storage (a URL path, through fsspec) an upload is atomic but may be cut short or
    corrupted on the way: the bytes go to a temporary object, are read back and checked (size and
    every zip record's CRC), and only then copied, server-side, onto the final name. A killed or
    failed save leaves the previous ``last.ckpt`` as it was.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage.is_url(str(path)):
            _save_to_url(checkpoint, str(path))
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @override
    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


def _save_to_url(checkpoint: dict[str, Any], url: str) -> None:
    """Writes a checkpoint object through a verified temporary object (see :class:`AtomicCheckpointIO`),
    retrying the whole upload while the store is unreachable, for up to ``CROPYIELD_RETRY_SECONDS``."""
    import fsspec

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    payload = buffer.getvalue()
    fs, key = fsspec.core.url_to_fs(url)
    _quiet_abandoned_requests()
    storage.retried(
        url,
        lambda: _upload(fs, key, payload, url),
        # s3fs and botocore raise their own types for a store out of reach; a bad upload, a denied
        # write or a missing bucket are not the network's
        retry_if=lambda err: not isinstance(err, (CropYieldError, PermissionError, FileNotFoundError)),
        failure="cannot save the checkpoint",
        kept=", the previous one is kept",
    )


def _quiet_abandoned_requests() -> None:
    """Keeps fsspec's event loop from printing a traceback for a request abandoned when the store
    went away: the failure is retried, then reported in one line, here."""
    import fsspec.asyn

    loop = fsspec.asyn.get_loop()

    def handler(loop, context) -> None:
        if not isinstance(context.get("exception"), OSError):  # a network error: already handled
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _upload(fs, key: str, payload: bytes, url: str) -> None:
    # Not named after the checkpoint: Lightning's `ckpt_path="last"` takes any name holding "last".
    tmp = f"{key.rsplit('/', 1)[0]}/.upload-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        fs.pipe_file(tmp, payload)
        written = fs.cat_file(tmp)
        try:
            with zipfile.ZipFile(io.BytesIO(written)) as archive:
                intact = len(written) == len(payload) and archive.testzip() is None
        except zipfile.BadZipFile:
            intact = False
        if not intact:
            raise CropYieldError(f"{url}: the uploaded checkpoint did not read back intact; the previous one is kept")
        fs.copy(tmp, key)
    finally:
        try:
            fs.rm_file(tmp)
        except Exception:  # best effort: an unreachable store keeps a hidden temporary object, never a bad last.ckpt
            pass
