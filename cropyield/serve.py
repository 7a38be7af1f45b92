"""The ``cropyield-serve`` command: a checkpoint behind an HTTP endpoint, served by LitServe.

    cropyield-serve --ckpt checkpoints/last.ckpt --port 8000
    curl -s localhost:8000/predict -d '{"rows": [[75, 63, 44]]}'
    curl -s localhost:8000/predict -d '{"rows": [{"temp": 75, "rainfall": 63, "humidity": 44}]}'

``POST /predict`` answers ``{"predictions": [{"apples": ..., "oranges": ...}, ...]}``, the numbers
``cropyield-predict --json`` prints for the same rows; ``GET /health`` answers 200 once the model is
loaded. A bad request gets a 400 whose ``detail`` names the problem in one line. SIGTERM or SIGINT
stops the server and every process it started: requests in flight are answered first.

litserve comes with the ``serve`` extra: ``pip install 'cropyield[serve]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence

import torch

from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor, predict

MAX_ROWS = 10_000


def parse_rows(
    body, feature_names: Sequence[str], max_rows: int = MAX_ROWS, encoding: dict | None = None
) -> torch.Tensor:
    """Validates a request body ``{"rows": [...]}``: rows of numbers or objects keyed by feature name.
    With ``encoding`` (a model with categorical columns), rows hold the raw columns, strings included.

    Raises:
        CropYieldError: a one-line description of what is wrong with the body.
    """
    if not isinstance(body, dict) or "rows" not in body:
        raise CropYieldError('the body must be a JSON object with "rows": a list of rows')
    rows = body["rows"]
    if not isinstance(rows, list) or not rows:
        raise CropYieldError('"rows" must be a non-empty list of rows')
    if len(rows) > max_rows:
        raise CropYieldError(f"{len(rows)} rows are more than the {max_rows} a request may hold; split the request")
    if encoding:
        return torch.from_numpy(Encoding.from_dict(encoding).encode_rows(rows))
    names, values = list(feature_names), []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if set(row) != set(names):
                raise CropYieldError(f"row {i}: expected the keys {names}, got {sorted(row)}")
            row = [row[name] for name in names]
        if not isinstance(row, list) or len(row) != len(names):
            raise CropYieldError(f"row {i}: expected {len(names)} values ({', '.join(names)}), got {row!r:.60}")
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CropYieldError(f"row {i}, {names[j]}: {value!r:.40} is not a number")
            if not math.isfinite(value):
                raise CropYieldError(f"row {i}, {names[j]}: {value} is not a finite number")
        values.append(row)
    return torch.tensor(values, dtype=torch.float32)


try:
    import litserve as ls
except ImportError:  # the `serve` extra is missing: main() says how to install it
    ls = None


class YieldAPI(ls.LitAPI if ls is not None else object):
    """The LitServe API: decode and validate, predict, encode (each a few lines).

    Args:
        model: the checkpoint's weights, loaded by the safe reader.
        max_rows: the most rows a request may hold.
        max_batch_size: requests LitServe may gather into one prediction.
        batch_timeout: seconds LitServe waits to fill a batch.
    """

    def __init__(self, model: LinearPredictor, max_rows: int = MAX_ROWS, max_batch_size: int = 1, batch_timeout=0.0):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model, self.max_rows = model, max_rows

    def setup(self, device) -> None:
        # Ctrl+C reaches every process of the terminal's group: this worker must keep answering
        # the requests in flight until the server stops it (with SIGTERM) once they are done.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.model = self.model.to(device)

    def decode_request(self, request) -> torch.Tensor:
        from fastapi import HTTPException

        try:
            return parse_rows(request, self.model.feature_names, self.max_rows, self.model.encoding)
        except CropYieldError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None

    def batch(self, inputs: list[torch.Tensor]):
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, x):
        if isinstance(x, tuple):  # a batch of requests, with each one's number of rows
            rows, sizes = x
            return predict(self.model, rows).split(sizes)
        return predict(self.model, x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:
        names = self.model.target_names
        return {"predictions": [dict(zip(names, row, strict=True)) for row in output.tolist()]}


def build_server(model: LinearPredictor, workers: int = 1, max_rows: int = MAX_ROWS, max_batch_size: int = 1,
                 batch_timeout: float = 0.0):  # fmt: skip
    """A ``LitServer`` around a loaded model (see the module's docstring for the API)."""
    if ls is None:
        raise CropYieldError("serving needs litserve; install it with: pip install 'cropyield[serve]'")
    api = YieldAPI(model, max_rows, max_batch_size, batch_timeout)
    return ls.LitServer(api, accelerator="cpu", workers_per_device=workers, timeout=30, middlewares=[(JsonBody, {})])


class JsonBody:
    """ASGI middleware: the body of ``POST /predict`` must be JSON, whatever its Content-Type.

    LitServe parses a form-encoded body (what ``curl -d`` sends) as a form, and answers a body that
    is not JSON with a 500; here the first is read as JSON and the second answered 400.
    """

    def __init__(self, app, path: str = "/predict") -> None:
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            json.loads(body)
        except ValueError as err:
            detail = json.dumps({"detail": f"the body is not valid JSON ({err})"}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": detail})
            return None
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


_MAIN = os.getpid()


def _stop(signum, frame):
    # LitServe shuts its processes down cleanly on KeyboardInterrupt (uvicorn finishes the requests
    # in flight first); SIGTERM would kill the main process alone and leave its workers running.
    if os.getpid() != _MAIN:  # a forked worker inherited this handler: die as the signal says
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``cropyield-serve``: a bad checkpoint is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="cropyield-serve",
        description="Serve a cropyield checkpoint over HTTP: POST /predict, GET /health.",
        epilog="example:\n  cropyield-serve --ckpt checkpoints/last.ckpt --port 8000\n"
        "  curl -s localhost:8000/predict -d '{\"rows\": [[75, 63, 44]]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve (read once, at start)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 (default), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes (default: 1)")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS, help=f"most rows a request may hold ({MAX_ROWS})")
    parser.add_argument(
        "--max-batch-size", type=int, default=1, help="requests LitServe may batch into one prediction (default: 1)"
    )
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds to wait to fill a batch")
    args = parser.parse_args(argv)
    try:
        if args.host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise CropYieldError(f"--host must be 127.0.0.1, 0.0.0.0 or ::, got {args.host}")
        if not 1024 <= args.port <= 65535:
            raise CropYieldError(f"--port must be from 1024 to 65535, got {args.port}")
        if args.workers < 1 or args.max_rows < 1 or args.max_batch_size < 1:
            raise CropYieldError("--workers, --max-rows and --max-batch-size must be at least 1")
        model = LinearPredictor.from_checkpoint(args.ckpt)
        server = build_server(model, args.workers, args.max_rows, args.max_batch_size, args.batch_timeout)
    except CropYieldError as err:
        print(f"cropyield-serve: error: {err}", file=sys.stderr)
        sys.exit(2)
    # Unbatched (the default), LitServe notes that batch/unbatch exist; they serve --max-batch-size.
    warnings.filterwarnings("ignore", message="The LitServer has both batch and unbatch methods implemented")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
