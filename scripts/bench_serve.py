"""Serving benchmark: ``cropyield-serve`` against a minimal FastAPI + uvicorn endpoint, side by side.

Run from the repository root (needs the ``serve`` extra), with a checkpoint to serve:

    cropyield fit --config exact.yaml && python scripts/bench_serve.py --ckpt checkpoints/last.ckpt

Every server runs at once on 127.0.0.1 (an idle one costs nothing): ``cropyield-serve`` with 1 and
2 worker processes, and the minimal endpoint below with 1 and 2. 8 client threads with keep-alive
connections send requests to one server at a time, single-row bodies, then 1,000-row bodies; the
servers take turns in several short rounds, so a load that comes and goes on a shared machine falls
on all of them alike. Prints requests/s and p50/p99 latency in Markdown, each cropyield-serve
figure as a ratio of the minimal endpoint with as many workers, and the CPU time the server's
processes spent per request (from /proc: what the load of other programs changes least).

The minimal endpoint is what FastAPI's tutorial would write: ``await request.json()``, a tensor,
the model, a dict returned for FastAPI to encode. It checks nothing that torch does not.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MINIMAL_APP = """
import os
import torch
from fastapi import FastAPI, Request
from cropyield.inference import LinearPredictor

model = LinearPredictor.from_checkpoint(os.environ["BENCH_CKPT"])
names = model.target_names
app = FastAPI()

@app.get("/health")
async def health():
    return {"status": "ok"}

@app.post("/predict")
async def predict(request: Request):
    body = await request.json()
    with torch.inference_mode():
        preds = model(torch.tensor(body["rows"], dtype=torch.float32))
    return {"predictions": [dict(zip(names, row)) for row in preds.tolist()]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited while starting; its log: {log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server on port {port} did not become healthy; its log: {log}")


def cpu_seconds(pgid: int) -> float:
    """CPU time used so far by the live processes of a server's process group (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def load(port: int, body: bytes, threads: int, seconds: float) -> tuple[list[float], float, int]:
    """Latencies of every request, the wall time and the count of non-200 answers."""
    latencies, errors = [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad = [], 0
        while time.monotonic() < stop and len(mine) < 100_000:
            start = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            bad += response.status != 200
        connection.close()
        with lock:
            latencies.extend(mine)
            errors.append(bad)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    begin = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return latencies, time.perf_counter() - begin, sum(errors)


def figures(latencies: list[float], wall: float, errors: int, cpu: float) -> dict:
    latencies = sorted(latencies)
    return {
        "cpu": 1e3 * cpu / len(latencies),
        "rps": len(latencies) / wall,
        "p50": 1e3 * latencies[len(latencies) // 2],
        "p99": 1e3 * latencies[int(len(latencies) * 0.99)],
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve")
    parser.add_argument("--seconds", type=float, default=1.0, help="load time per server and round (default: 1)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of turns per request size (default: 8)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default: 8)")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=COMMAND",
        help="also measure another server, e.g. an earlier cropyield-serve; '--port N' is appended",
    )
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    serve = [str(bin_dir / "cropyield-serve"), "--ckpt", args.ckpt]
    folder = tempfile.mkdtemp(prefix="bench_serve_")
    Path(folder, "minimal_app.py").write_text(MINIMAL_APP)
    minimal = [sys.executable, "-m", "uvicorn", "minimal_app:app", "--app-dir", folder, "--no-access-log"]
    servers = {
        "cropyield-serve": (serve, "minimal FastAPI + uvicorn"),
        "cropyield-serve --workers 2": ([*serve, "--workers", "2"], "minimal FastAPI + uvicorn, --workers 2"),
        "minimal FastAPI + uvicorn": (minimal, None),
        "minimal FastAPI + uvicorn, --workers 2": ([*minimal, "--workers", "2"], None),
    }
    for also in args.also:
        label, _, command = also.partition("=")
        servers[label] = (command.split(), "minimal FastAPI + uvicorn")
    bodies = {
        "1 row": json.dumps({"rows": [[75, 63, 44]]}).encode(),
        "1,000 rows": json.dumps({"rows": [[75 + i % 7, 63 + i % 5, 44 + i % 3] for i in range(1000)]}).encode(),
    }
    env = {**os.environ, "BENCH_CKPT": str(Path(args.ckpt).resolve())}
    ports, processes = {}, []
    try:
        for name, (command, _) in servers.items():
            ports[name] = free_port()
            with open(Path(folder, f"{ports[name]}.log"), "wb") as log:
                command = [*command, "--port", str(ports[name])]
                processes.append(subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env))
        for name, process in zip(servers, processes, strict=True):
            wait_healthy(ports[name], process, Path(folder, f"{ports[name]}.log"))
        print(
            f"{os.cpu_count()} CPU cores shared with the clients, {args.threads} client threads, "
            f"{args.rounds} rounds of {args.seconds:g} s per server and request size, servers in turn\n"
        )
        print("| server | request | requests/s | p50 ms | p99 ms | non-200 | vs minimal | server CPU ms/request |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for kind, body in bodies.items():
            for name in servers:
                load(ports[name], body, args.threads, 0.5)  # warm-up: connections, caches, JIT-free paths
            results = {name: ([], 0.0, 0, 0.0) for name in servers}
            for turn in range(args.rounds):
                order = list(zip(servers, processes, strict=True))
                for name, process in order if turn % 2 == 0 else order[::-1]:  # no server always first
                    cpu = cpu_seconds(process.pid)
                    latencies, wall, errors = load(ports[name], body, args.threads, args.seconds)
                    cpu = cpu_seconds(process.pid) - cpu
                    kept = results[name]
                    results[name] = (kept[0] + latencies, kept[1] + wall, kept[2] + errors, kept[3] + cpu)
            measured = {name: figures(*result) for name, result in results.items()}
            for name, (_, baseline) in servers.items():
                r = measured[name]
                ratio = f"{r['rps'] / measured[baseline]['rps']:.2f}x" if baseline else ""
                row = f"{r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {ratio} | {r['cpu']:.2f}"
                print(f"| {name} | {kind} | {row} |", flush=True)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


if __name__ == "__main__":
    main()
