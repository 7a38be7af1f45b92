"""`cropyield-serve`: the API, bad requests, a bounded load test on 127.0.0.1, and a clean stop."""

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from cropyield.errors import CropYieldError
from cropyield.serve import parse_rows

from .conftest import BIN, assert_one_line_error, run
from .test_inference import CreatesFile

pytest.importorskip("litserve")

NAMES = ["temp", "rainfall", "humidity"]


def test_parse_rows_accepts_lists_and_named_objects():
    rows = parse_rows({"rows": [[75, 63, 44.5], {"humidity": 44, "temp": 75, "rainfall": 63}]}, NAMES)
    assert torch.equal(rows, torch.tensor([[75, 63, 44.5], [75, 63, 44]]))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([1, 2], '"rows"'),
        ({"rows": []}, "non-empty"),
        ({"rows": [[1, 2]]}, "row 0: expected 3 values"),
        ({"rows": [[1, 2, "x"]]}, "row 0, humidity: 'x' is not a number"),
        ({"rows": [[1, True, 3]]}, "rainfall: True is not a number"),
        ({"rows": [[1, 2, float("nan")]]}, "not a finite number"),
        ({"rows": [{"temp": 1, "rain": 2, "humidity": 3}]}, "expected the keys"),
        ({"rows": [[1, 2, 3]] * 11}, "more than the 10 a request may hold"),
    ],
)
def test_parse_rows_names_the_problem(body, fragment):
    with pytest.raises(CropYieldError, match=fragment.replace("(", r"\(")):
        parse_rows(body, NAMES, max_rows=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def group_processes(pgid: int) -> list[int]:
    """Processes of a process group (the server was started as a group leader)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


class Server:
    def __init__(self, ckpt: Path, *args):
        self.port = free_port()
        command = [str(BIN / "cropyield-serve"), "--ckpt", str(ckpt), "--port", str(self.port), *map(str, args)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited while starting"
            try:
                if request(self.port, "GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError("the server did not become healthy in 90 s")

    def post(self, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, raw = request(self.port, "POST", "/predict", data)
        return status, json.loads(raw)

    def stop(self, signum=signal.SIGTERM) -> float:
        """SIGTERM to the server process alone (as a container runtime sends it), SIGINT to its whole
        process group (as Ctrl+C in a terminal does); returns the seconds until every process ended."""
        start = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        self.process.wait(timeout=30)
        while group_processes(self.process.pid) and time.monotonic() - start < 30:
            time.sleep(0.1)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    run("cropyield", "fit", "--config", "exact.yaml", cwd=folder)
    return folder / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server(checkpoint, "--max-rows", "1000")
    yield server
    server.stop()


def test_predictions_equal_the_predict_command(server, checkpoint):
    rows = [[75, 63, 44], [80, 70, 50]]
    printed = run("cropyield-predict", "--ckpt", checkpoint, *rows[0], *rows[1], "--json", cwd=checkpoint.parent)
    expected = json.loads(printed.stdout)
    assert server.post({"rows": rows}) == (200, {"predictions": expected})
    named = [dict(zip(NAMES, row, strict=True)) for row in rows]
    assert server.post({"rows": named}) == (200, {"predictions": expected})


@pytest.mark.slow
def test_a_mix_of_good_and_bad_requests_from_several_threads(server, checkpoint):
    """8 threads, 40 requests each, half of them bad: every good answer right, every bad one a 400."""
    from cropyield.inference import LinearPredictor, predict

    model = LinearPredictor.from_checkpoint(checkpoint)
    bad = [b"not json", b'{"rows": []}', b'{"rows": [[1, 2]]}', b'{"rows": [["a", 2, 3]]}', b'{"rows": [[NaN, 1, 2]]}',
           b'{"rows": [[Infinity, 1, 2]]}', b'{"x": 1}', json.dumps({"rows": [[1, 2, 3]] * 1001}).encode()]  # fmt: skip
    failures, counts = [], {"good": 0, "bad": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        generator = torch.Generator().manual_seed(k)
        for i in range(40):
            try:
                if i % 2:
                    status, answer = server.post(bad[(i + k) % len(bad)])
                    ok = 400 <= status < 500 and isinstance(answer.get("detail"), str) and "\n" not in answer["detail"]
                    kind = "bad"
                else:
                    rows = (torch.rand(1 + (i * 37 + k) % 300, 3, generator=generator) * 100).tolist()
                    status, answer = server.post({"rows": rows})
                    expected = predict(model, rows).tolist()
                    got = [[p["apples"], p["oranges"]] for p in answer["predictions"]] if status == 200 else None
                    ok, kind = status == 200 and got == expected, "good"
            except Exception as err:  # any failure of the server is a failure of the test
                ok, kind, status = False, "error", repr(err)
            with lock:
                counts[kind] = counts.get(kind, 0) + 1
                if not ok:
                    failures.append((k, i, status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:5]
    assert counts == {"good": 160, "bad": 160}
    assert request(server.port, "GET", "/health")[0] == 200


@pytest.mark.parametrize("name", ["missing.ckpt", "corrupt.ckpt", "evil.ckpt"])
def test_a_bad_checkpoint_is_one_line_and_starts_no_server(tmp_path, checkpoint, name):
    if name == "corrupt.ckpt":
        good = checkpoint.read_bytes()
        (tmp_path / name).write_bytes(good[: len(good) // 2])
    elif name == "evil.ckpt":
        evil = torch.load(checkpoint, weights_only=True)
        evil["hyper_parameters"]["payload"] = CreatesFile(tmp_path / "pwned")
        torch.save(evil, tmp_path / name)
    port = free_port()
    result = run("cropyield-serve", "--ckpt", name, "--port", port, cwd=tmp_path, check_rc=None, timeout=60)
    assert_one_line_error(result, "cropyield-serve: error:", name)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(OSError):
        request(port, "GET", "/health", timeout=2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_and_answers_requests_in_flight(checkpoint, signum):
    server = Server(checkpoint)
    assert len(group_processes(server.process.pid)) >= 3  # the server, its API server, its inference worker
    statuses, stop = [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                statuses.append(server.post({"rows": [[75, 63, 44]] * 200})[0])
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                return  # the server has stopped listening

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(1.0)
    seconds = server.stop(signum)
    stop.set()
    thread.join(timeout=30)
    assert seconds < 10 and group_processes(server.process.pid) == []
    assert statuses and set(statuses) == {200}, statuses[-5:]


def test_a_model_with_categorical_columns_serves_named_rows_with_strings(tmp_path):
    from .test_encoding import TARGET, make_crops, write_crops

    write_crops(make_crops(600, areas=3, crops=3, seed=1), tmp_path / "yield.csv")
    run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", "yield.csv", "--data.target_names",
        f"[{TARGET}]", cwd=tmp_path)  # fmt: skip
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    row = {"Area": "Brazil", "Item": "Rice, paddy", "Year": 2001, "average_rain_fall_mm_per_year": 1100.5,
           "pesticides_tonnes": 120.0, "avg_temp": 21.5}  # fmt: skip
    printed = run("cropyield-predict", "--ckpt", checkpoint, *row.values(), "--json", cwd=tmp_path)
    server = Server(checkpoint)
    try:
        assert server.post({"rows": [row, list(row.values())]}) == (
            200,
            {"predictions": json.loads(printed.stdout) * 2},
        )
        status, body = server.post({"rows": [row, {**row, "Item": "Oats"}]})
        assert status == 400 and "row 1, column 'Item': level 'Oats' was not in the training data" in body["detail"]
        status, body = server.post({"rows": [{**row, "avg_temp": None}]})
        assert status == 400 and "row 0, column 'avg_temp': missing value" in body["detail"]
    finally:
        server.stop()
