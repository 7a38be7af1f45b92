"""The ``cropyield-serve`` command: a checkpoint behind an HTTP endpoint, FastAPI on uvicorn.

    cropyield-serve --ckpt checkpoints/last.ckpt --port 8000
    curl -s localhost:8000/predict --json '{"rows": [[75, 63, 44]]}'
    curl -s localhost:8000/predict --json '{"rows": [{"temp": 75, "rainfall": 63, "humidity": 44}]}'

``POST /predict`` answers ``{"predictions": [{"apples": ..., "oranges": ...}, ...]}``, the numbers
``cropyield-predict --json`` prints for the same rows; ``GET /health`` answers 200 once the model is
loaded. A bad request gets a 4xx whose ``detail`` names the problem in one line. The model runs in
the request's own process (a 3x2 linear layer takes microseconds: a hop to another process would
cost more than the prediction); ``--workers N`` runs N uvicorn worker processes for several cores.
SIGTERM or SIGINT stops the server and its workers: requests in flight are answered first
(uvicorn's graceful shutdown).

fastapi and uvicorn come with the ``serve`` extra: ``pip install 'cropyield[serve]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cropyield import storage
from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor, encode_inputs, prediction_table, records, rows_tensor

try:
    import fastapi
except ImportError:  # the `serve` extra is missing: main() says how to install it
    fastapi = None

MAX_ROWS = 10_000
# uvicorn's worker processes build their own app (an import string and a factory); the parent has
# already read and checked the checkpoint, so these carry only its path and the row limit.
_CKPT_ENV, _MAX_ROWS_ENV = "CROPYIELD_SERVE_CKPT", "CROPYIELD_SERVE_MAX_ROWS"
_GRACE_S = 7  # the longest uvicorn waits for requests in flight once told to stop: all gone within 10 s
# A body up to this size (about 800 rows) is answered on the event loop, in about a millisecond of
# work; a larger one in a thread, so the loop keeps accepting and reading the requests that arrive
# meanwhile: uvicorn's graceful shutdown answers a request it has read, and drops one left unread.
_INLINE_BYTES = 16_384
_BYTES_PER_VALUE = 256  # a generous bound on one value's JSON, its key and separators included
# Built once (json.dumps with options builds an encoder per call); a prediction beyond float32's
# range is refused rather than written as Infinity, which is not JSON.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class BadRequest(CropYieldError):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _level(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CropYieldError(f'"interval" must be a level such as 0.95, got {value!r:.40}')
    return float(value)


def _kind(value) -> str:
    if value not in ("prediction", "mean"):
        raise CropYieldError(f'"kind" must be "prediction" or "mean", got {value!r:.40}')
    return value


# Keys a body may hold besides "rows", each with the check of its value: keyword arguments of
# cropyield.inference.prediction_table, as cropyield-predict's --interval and --kind give them.
_OPTIONS: dict[str, Callable[[object], object]] = {"interval": _level, "kind": _kind}


def decode(body: bytes, content_type: str | None, model: LinearPredictor, max_rows: int = MAX_ROWS):
    """Validates a request: a JSON object ``{"rows": [...]}`` sent as ``application/json``.

    Returns:
        The model's inputs, a float32 tensor ``[rows, features]`` (:func:`model_inputs`), and the
        keyword arguments the body gives :func:`cropyield.inference.predict`.

    Raises:
        BadRequest: 415 for another Content-Type (``curl -d`` sends a form), 413 for more than
            ``max_rows`` rows, 400 for anything else, each naming the problem in one line.
    """
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise BadRequest(
            f"the body must be JSON sent as Content-Type: application/json, not {media} "
            "(with curl: --json '{...}', or -H 'Content-Type: application/json')",
            415,
        )
    try:
        request = json.loads(body)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise BadRequest(f"the body is not valid JSON ({err})") from None
    if not isinstance(request, dict) or "rows" not in request:
        raise BadRequest('the body must be a JSON object with "rows": a list of rows')
    if len(request) > 1:
        unknown = sorted(set(request) - {"rows", *_OPTIONS})
        if unknown:  # a misspelt option must not pass unnoticed
            raise BadRequest(f"unknown key(s) {unknown} in the body; it holds {['rows', *_OPTIONS]}")
    rows = request["rows"]
    if isinstance(rows, list) and len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows are more than the {max_rows} a request may hold; split the request", 413)
    try:
        options = {key: check(request[key]) for key, check in _OPTIONS.items() if key in request}
        return model_inputs(model, rows), options
    except CropYieldError as err:
        raise BadRequest(str(err)) from None


def model_inputs(model: LinearPredictor, rows) -> torch.Tensor:
    """A request's rows as the model's inputs: the one place that turns JSON rows into a tensor.

    Raises:
        CropYieldError: naming the first bad row and feature (:func:`cropyield.inference.rows_tensor`).
    """
    if getattr(model, "encoding", None):  # categorical columns: the raw columns, strings included
        return encode_inputs(model, rows)
    return rows_tensor(rows, model.feature_names)


def encode(preds, target_names: Sequence[str]) -> bytes:
    """The answer's JSON, ``{"predictions": [...]}``, as :func:`cropyield.inference.records` makes it.

    Raises:
        BadRequest: a prediction overflowed float32 (JSON has no infinity).
    """
    try:
        return _JSON.encode({"predictions": records(preds, target_names)}).encode()
    except ValueError:  # allow_nan=False: JSON has no infinity
        raise BadRequest("a prediction is beyond float32's range: the inputs are far from the training data") from None


def create_app(model: LinearPredictor, max_rows: int = MAX_ROWS):
    """The FastAPI app serving ``model``: ``POST /predict`` and ``GET /health``."""
    if fastapi is None:
        raise CropYieldError("serving needs fastapi and uvicorn; install them with: pip install 'cropyield[serve]'")
    app = fastapi.FastAPI(title="cropyield", summary="Crop yields predicted from a cropyield checkpoint")
    max_bytes = 65_536 + max_rows * len(model.feature_names) * _BYTES_PER_VALUE

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    # One thread: under the GIL more would not predict faster, and each would keep the event loop
    # waiting longer for its turn.
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cropyield-predict")

    def answer(body: bytes, content_type: str | None) -> bytes:
        x, options = decode(body, content_type, model, max_rows)
        try:
            return encode(*prediction_table(model, x, **options))
        except CropYieldError as err:  # an interval the model cannot give, a level out of (0, 1)
            raise BadRequest(str(err)) from None

    # Plain JSON in and pre-encoded JSON out, no pydantic model: its errors are lists of objects,
    # not one line, and validating and re-encoding every value would cost more than the prediction.
    @app.post("/predict", response_class=fastapi.Response)
    async def predict_rows(request: fastapi.Request) -> fastapi.Response:
        try:
            body = await _read(request, max_bytes)
            content_type = request.headers.get("content-type")
            if len(body) <= _INLINE_BYTES:
                content = answer(body, content_type)
            else:  # the event loop stays free to accept and read the requests that arrive meanwhile
                content = await asyncio.get_running_loop().run_in_executor(thread, answer, body, content_type)
        except BadRequest as err:
            raise fastapi.HTTPException(err.status, str(err)) from None
        return fastapi.Response(content, media_type="application/json")

    return app


async def _read(request, max_bytes: int) -> bytes:
    """The body, refused with 413 past ``max_bytes`` (a request of ``--max-rows`` rows is far smaller)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"the body is {int(declared)} bytes, more than the {max_bytes} a request may hold", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(f"the body is more than the {max_bytes} bytes a request may hold", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def app_from_env():
    """The app factory each uvicorn worker process calls (``--workers N``)."""
    model = LinearPredictor.from_checkpoint(os.environ[_CKPT_ENV])
    return create_app(model, int(os.environ[_MAX_ROWS_ENV]))


def _check_port(host: str, port: int) -> None:
    # Tried here so that a taken port is one line and exit 2; uvicorn binds it again right after.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise CropYieldError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``cropyield-serve``: a bad checkpoint is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="cropyield-serve",
        description="Serve a cropyield checkpoint over HTTP: POST /predict, GET /health.",
        epilog="example:\n  cropyield-serve --ckpt checkpoints/last.ckpt --port 8000\n"
        "  curl -s localhost:8000/predict --json '{\"rows\": [[75, 63, 44]]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve (read once, at start)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; all: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS, help=f"most rows a request may hold ({MAX_ROWS})")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    args = parser.parse_args(argv)
    try:
        if not 1 <= args.port <= 65535:
            raise CropYieldError(f"--port must be from 1 to 65535, got {args.port}")
        if args.workers < 1 or args.max_rows < 1:
            raise CropYieldError("--workers and --max-rows must be at least 1")
        model = LinearPredictor.from_checkpoint(args.ckpt)
        app = create_app(model, args.max_rows)
        _check_port(args.host, args.port)
    except CropYieldError as err:
        print(f"cropyield-serve: error: {err}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    options = {"host": args.host, "port": args.port, "access_log": args.access_log}
    options["timeout_graceful_shutdown"] = _GRACE_S
    if args.workers == 1:
        uvicorn.run(app, **options)
    else:
        # A URL as it is (Path would fold s3://b/k into s3:/b/k), a local path made absolute.
        ckpt = args.ckpt if storage.is_url(args.ckpt) else str(Path(args.ckpt).resolve())
        os.environ[_CKPT_ENV], os.environ[_MAX_ROWS_ENV] = ckpt, str(args.max_rows)
        # A worker answers uvicorn's health check only once it has imported torch, which can take
        # longer than uvicorn's 5 s on a loaded machine: uvicorn would kill and restart it.
        options["timeout_worker_healthcheck"] = 60
        uvicorn.run("cropyield.serve:app_from_env", factory=True, workers=args.workers, **options)
