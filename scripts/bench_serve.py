"""Serving benchmark: ``cropyield-serve`` (LitServe) against a minimal FastAPI + uvicorn endpoint.

Run from the repository root (needs the ``serve`` extra), with a checkpoint to serve:

    cropyield fit --config exact.yaml && python scripts/bench_serve.py --ckpt checkpoints/last.ckpt

Each server runs alone on 127.0.0.1; 8 client threads with keep-alive connections send requests
for a fixed time (a bounded count), single-row bodies, then 1,000-row bodies. Prints requests/s and
p50/p99 latency in Markdown. The FastAPI endpoint does the same work (parse, validate, predict,
encode) in one process, with no batching or worker processes.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FASTAPI_APP = """
import sys
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor, predict
from cropyield.serve import parse_rows

model = LinearPredictor.from_checkpoint(sys.argv[1])
app = FastAPI()

@app.get("/health")
def health():
    return "ok"

@app.post("/predict")
async def endpoint(request: Request):
    try:
        rows = parse_rows(await request.json(), model.feature_names)
    except CropYieldError as err:
        raise HTTPException(400, str(err)) from None
    names = model.target_names
    return {"predictions": [dict(zip(names, row)) for row in predict(model, rows).tolist()]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the server exited while starting")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become healthy")


def load(port: int, body: bytes, threads: int, seconds: float) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.monotonic() < stop and len(mine) < 100_000:
            start = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                errors.append(response.status)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    begin = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - begin
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50": 1e3 * latencies[len(latencies) // 2],
        "p99": 1e3 * latencies[int(len(latencies) * 0.99)],
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per measurement (default: 8)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default: 8)")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    servers = {
        "cropyield-serve (LitServe, 1 worker)": [str(bin_dir / "cropyield-serve"), "--ckpt", args.ckpt],
        "cropyield-serve, --max-batch-size 8 --batch-timeout 0.002": [
            *[str(bin_dir / "cropyield-serve"), "--ckpt", args.ckpt],
            *["--max-batch-size", "8", "--batch-timeout", "0.002"],
        ],
        "minimal FastAPI + uvicorn": [sys.executable, "-c", FASTAPI_APP, args.ckpt],
    }
    bodies = {
        "1 row": json.dumps({"rows": [[75, 63, 44]]}).encode(),
        "1,000 rows": json.dumps({"rows": [[75 + i % 7, 63 + i % 5, 44 + i % 3] for i in range(1000)]}).encode(),
    }
    print(f"{os.cpu_count()} CPU cores, {args.threads} client threads on the same machine, {args.seconds:g} s each\n")
    print("| server | request | requests/s | p50 ms | p99 ms | non-200 |")
    print("|---|---|---:|---:|---:|---:|")
    for name, command in servers.items():
        port = free_port()
        command = [*command, "--port", str(port)] if "cropyield-serve" in command[0] else [*command, str(port)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        process = subprocess.Popen(command, **quiet, start_new_session=True)
        try:
            wait_healthy(port, process)
            for kind, body in bodies.items():
                load(port, body, args.threads, 1.0)  # warm-up
                r = load(port, body, args.threads, args.seconds)
                figures = f"{r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']}"
                print(f"| {name} | {kind} | {figures} |", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
