"""`cropyield-serve`: the request contract, bad requests, load from several threads, and a clean stop
that answers the requests in flight. Servers listen on 127.0.0.1 only and are always stopped."""

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from cropyield import CropYieldDataModule, LeastSquaresRegressor, load_regressor
from cropyield.data import FEATURE_NAMES, TARGET_NAMES
from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor
from cropyield.serve import BadRequest, decode, encode

from .conftest import BIN, assert_one_line_error, run, upload, write_csv
from .test_inference import CreatesFile

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

NAMES = ["temp", "rainfall", "humidity"]
JSON = "application/json"
MODEL = LinearPredictor(
    {"linear.weight": torch.ones(2, 3), "linear.bias": torch.zeros(2)},
    {"feature_names": NAMES, "target_names": TARGET_NAMES, "in_features": 3, "out_features": 2},
)


def body(rows, **extra) -> bytes:
    return json.dumps({"rows": rows, **extra}).encode()


def test_decode_accepts_lists_and_named_rows_ignoring_extra_keys():
    named = {"humidity": 44, "region": "north", "temp": 75, "rainfall": 63, "notes": None}
    rows, options = decode(body([[75, 63, 44.5], named, [1e38, 0, -2]]), JSON, MODEL)
    assert torch.equal(rows, torch.tensor([[75, 63, 44.5], [75, 63, 44], [1e38, 0, -2]])) and options == {}
    for content_type in (None, "application/json; charset=utf-8", "application/vnd.api+json"):
        assert torch.equal(decode(body([[1, 2, 3]]), content_type, MODEL)[0], torch.tensor([[1.0, 2, 3]]))


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "fragment"),
    [
        (b"rows=[[1,2,3]]", "application/x-www-form-urlencoded", 415, "Content-Type: application/json"),
        (b"not json", JSON, 400, "not valid JSON"),
        (b"", JSON, 400, "not valid JSON"),
        (b"\xff\xfe", JSON, 400, "not valid JSON"),
        (b"[1, 2]", JSON, 400, '"rows"'),
        (b'{"x": 1}', JSON, 400, '"rows"'),
        (body([[1, 2, 3]], intervals=0.9), JSON, 400, "unknown key(s) ['intervals']"),
        (body([]), JSON, 400, "non-empty"),
        (body({"temp": 1}), JSON, 400, "non-empty list"),
        (body([[1, 2]]), JSON, 400, "row 0: expected 3 values"),
        (body([[1, 2, 3], [4, 5, 6, 7]]), JSON, 400, "row 1: expected 3 values"),
        (body([[1, 2, "x"]]), JSON, 400, "row 0, humidity: 'x' is not a number"),
        (body([[1, 2, "3"]]), JSON, 400, "row 0, humidity: '3' is not a number"),
        (body([[1, True, 3]]), JSON, 400, "row 0, rainfall: True is not a number"),
        (body([[1, 2, None]]), JSON, 400, "row 0, humidity: None is not a number"),
        (b'{"rows": [[1, 2, 3], [NaN, 1, 2]]}', JSON, 400, "row 1, temp: nan is not a finite number"),
        (b'{"rows": [[1, -Infinity, 2]]}', JSON, 400, "row 0, rainfall: -inf is not a finite number"),
        (body([[1, 2, 1e39]]), JSON, 400, "row 0, humidity: 1e+39 is beyond float32's range"),
        (body([{"temp": 1, "rain": 2, "humidity": 3}]), JSON, 400, "row 0: missing ['rainfall']"),
        (body([[1, 2, 3]] * 11), JSON, 413, "11 rows are more than the 10 a request may hold"),
    ],
)
def test_decode_names_the_problem(raw, content_type, status, fragment):
    with pytest.raises(BadRequest) as caught:
        decode(raw, content_type, MODEL, max_rows=10)
    assert caught.value.status == status and isinstance(caught.value, CropYieldError)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_encode_refuses_a_prediction_beyond_float32():
    assert json.loads(encode(torch.tensor([[1.5, -2.0]]), ["a", "b"])) == {"predictions": [{"a": 1.5, "b": -2.0}]}
    with pytest.raises(BadRequest, match="beyond float32's range"):
        encode(torch.tensor([[float("inf"), 1.0]]), ["a", "b"])


# --- a real server, over 127.0.0.1 ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, data: bytes | None = None, content_type=JSON, timeout: float = 60):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def group_processes(pgid: int) -> list[int]:
    """Live processes of a process group (the server is started as a group leader)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


class Server:
    """``cropyield-serve`` in its own process group, its stderr kept in ``log``."""

    def __init__(self, ckpt: Path, log: Path, *args):
        self.port, self.log = free_port(), log
        command = [str(BIN / "cropyield-serve"), "--ckpt", str(ckpt), "--port", str(self.port), *map(str, args)]
        with open(log, "wb") as err:
            self.process = subprocess.Popen(command, stdout=err, stderr=err, start_new_session=True)
        try:
            self._wait_healthy(120)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited while starting:\n{self.log.read_text()}"
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become healthy in {seconds} s:\n{self.log.read_text()}")

    def wait_started(self, workers: int, seconds: float = 120) -> None:
        """Until every worker has finished starting (each logs it): health answers once one has, and a
        signal to the group while another is still importing torch interrupts that import instead."""
        deadline = time.monotonic() + seconds
        while self.log.read_text().count("Application startup complete.") < workers:
            assert time.monotonic() < deadline, f"{workers} workers not started in {seconds} s:\n{self.log.read_text()}"
            time.sleep(0.1)

    def post(self, data, content_type=JSON) -> tuple[int, dict]:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        status, answer = request(self.port, "POST", "/predict", raw, content_type)
        return status, json.loads(answer)

    def stop(self, signum=signal.SIGTERM) -> float:
        """SIGTERM to the server process alone (as a container runtime sends it), SIGINT to its whole
        process group (as Ctrl+C in a terminal does); returns the seconds until every process ended."""
        start = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=20)
        finally:
            while group_processes(self.process.pid) and time.monotonic() - start < 20:
                time.sleep(0.05)
        return time.monotonic() - start

    def kill(self) -> None:
        """The last resort of a finally: nothing of the server outlives the test."""
        if group_processes(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An exact fit on standardized inputs, so the scaler is on the served path too."""
    folder = tmp_path_factory.mktemp("serve")
    L.seed_everything(0, verbose=False)
    model = LeastSquaresRegressor(feature_names=FEATURE_NAMES, target_names=TARGET_NAMES, standardize=True)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(max_epochs=1, enable_model_summary=False, accelerator="cpu", **quiet)
    trainer.fit(model, CropYieldDataModule(standardize=True, shuffle=False))
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


def expected(checkpoint: Path, rows) -> list[dict]:
    """The predictions of the checkpoint's own Lightning model, computed here."""
    model = load_regressor(checkpoint)
    with torch.no_grad():
        preds = model(torch.tensor(rows, dtype=torch.float32))
    return [dict(zip(TARGET_NAMES, row, strict=True)) for row in preds.tolist()]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """One server with every default setting (--max-rows 10,000 included)."""
    server = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield server
    finally:
        server.stop()
        server.kill()


def test_answers_equal_the_model_and_the_predict_command_and_start_is_quiet(server, checkpoint):
    rows = [[75, 63, 44], [80, 70, 50], [-3.5, 1e3, 0]]
    want = expected(checkpoint, rows)
    values = [v for row in rows for v in row]
    printed = run("cropyield-predict", "--ckpt", checkpoint, *values, "--json", cwd=checkpoint.parent)
    assert json.loads(printed.stdout) == want
    assert server.post({"rows": rows}) == (200, {"predictions": want})
    named = [dict(zip(NAMES, row, strict=True)) for row in rows]
    assert server.post({"rows": named}) == (200, {"predictions": want})
    assert request(server.port, "GET", "/health") == (200, b'{"status":"ok"}')
    log = server.log.read_text()
    assert "Uvicorn running on http://127.0.0.1" in log
    assert "warn" not in log.lower() and "Traceback" not in log, log


def test_extra_keys_and_extra_columns_are_ignored_alike(server, checkpoint, tmp_path):
    """One policy: ``cropyield-predict --csv`` ignores a file's other columns, the server a row's other keys."""
    rows = [["north", 75, 63, 44, "dry"], ["south", 91, 88, 64, "wet"]]
    csv = write_csv(tmp_path / "regions.csv", ["region", "temp", "rainfall", "humidity", "notes"], rows)
    printed = run("cropyield-predict", "--ckpt", checkpoint, "--csv", csv, "--json", cwd=tmp_path)
    want = expected(checkpoint, [row[1:4] for row in rows])
    assert json.loads(printed.stdout) == want
    named = [{"region": r[0], "notes": r[4], "humidity": r[3], "temp": r[1], "rainfall": r[2]} for r in rows]
    assert server.post({"rows": named}) == (200, {"predictions": want})


def test_bad_requests_get_a_4xx_with_one_line_and_the_default_row_limit_holds(server, checkpoint):
    cases = [
        (b'{"rows": [[75, 63, 44]]}', "application/x-www-form-urlencoded", 415),  # what curl -d sends
        (b"rows=75,63,44", "application/x-www-form-urlencoded", 415),
        (b"not json", JSON, 400),
        (b'{"rows": [["a", 2, 3]]}', JSON, 400),
        (b'{"rows": [[NaN, 1, 2]]}', JSON, 400),
        (body([[1, 2, 3]] * 10_001), JSON, 413),  # the default --max-rows is 10,000
        (b"[" * 8_000_000, JSON, 413),  # over the bytes 10,000 rows could take: refused unread
    ]
    for raw, content_type, status in cases:
        got, answer = server.post(raw, content_type)
        assert got == status, (raw[:40], answer)
        assert isinstance(answer["detail"], str) and "\n" not in answer["detail"]
    rows = (torch.arange(30_000, dtype=torch.float32).reshape(10_000, 3) % 97).tolist()
    assert server.post({"rows": rows}) == (200, {"predictions": expected(checkpoint, rows)})


def test_an_interval_in_the_body_answers_as_predict_interval_does(server, checkpoint):
    rows = [[75, 63, 44], [91, 88, 64]]
    values = [v for row in rows for v in row]
    for kind in ("prediction", "mean"):
        printed = run("cropyield-predict", "--ckpt", checkpoint, *values, "--interval", "0.9", "--kind", kind, "--json",
                      cwd=checkpoint.parent)  # fmt: skip
        want = json.loads(printed.stdout)
        assert server.post({"rows": rows, "interval": 0.9, "kind": kind}) == (200, {"predictions": want})
        for answer, plain in zip(want, expected(checkpoint, rows), strict=True):
            for name in TARGET_NAMES:
                assert answer[f"{name}_lower"] < answer[name] < answer[f"{name}_upper"]
                assert answer[name] == pytest.approx(plain[name], rel=1e-6)
    for options, fragment in [({"interval": 1.5}, "(0, 1)"), ({"interval": "95%"}, '"interval" must be a level'),
                              ({"interval": 0.9, "kind": "median"}, '"kind" must be')]:  # fmt: skip
        status, answer = server.post({"rows": rows, **options})
        assert status == 400 and fragment in answer["detail"] and "\n" not in answer["detail"], answer


@pytest.mark.slow
def test_a_mix_of_good_and_bad_requests_from_several_threads(server, checkpoint):
    """8 threads, 40 requests each, half of them bad: every good answer right, every bad one a 4xx."""
    bad = [b"not json", b'{"rows": []}', b'{"rows": [[1, 2]]}', b'{"rows": [["a", 2, 3]]}', b'{"rows": [[NaN, 1, 2]]}',
           b'{"rows": [[Infinity, 1, 2]]}', b'{"x": 1}', body([[1, 2, 3]] * 10_001)]  # fmt: skip
    model = load_regressor(checkpoint)
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
                    x = torch.rand(1 + (i * 37 + k) % 300, 3, generator=generator) * 100
                    status, answer = server.post({"rows": x.tolist()})
                    with torch.no_grad():
                        want = model(torch.tensor(x.tolist())).tolist()
                    got = [[p["apples"], p["oranges"]] for p in answer["predictions"]] if status == 200 else None
                    ok, kind = status == 200 and got == want, "good"
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


def test_a_port_in_use_is_one_line(tmp_path, checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("cropyield-serve", "--ckpt", checkpoint, "--port", port, cwd=tmp_path, check_rc=None, timeout=60)
    assert_one_line_error(result, "cropyield-serve: error:", f"port {port}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGINT, 2)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-workers2", "SIGINT-workers2"],
)
def test_a_signal_answers_every_request_in_flight_then_stops_every_process(checkpoint, tmp_path, signum, workers):
    """Requests sent before the signal each get a 200 with the right predictions; a reset connection,
    a truncated or non-JSON answer is a failure. Then no process of the server is left within 10 s."""
    clients, size = 6, 10_000  # requests of the default --max-rows: each takes a while to answer
    rows = (torch.arange(size * 3, dtype=torch.float32).reshape(size, 3) % 101).tolist()
    raw, want = body(rows), expected(checkpoint, rows)
    server = Server(checkpoint, tmp_path / "server.log", "--workers", workers)
    try:
        server.wait_started(workers)
        assert len(group_processes(server.process.pid)) >= 1 + workers * (workers > 1)
        sent = [threading.Event() for _ in range(clients)]
        answers = [None] * clients

        def client(k: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                connection.request("POST", "/predict", body=raw, headers={"Content-Type": JSON})
                sent[k].set()
                response = connection.getresponse()
                answer = response.read()
                answers[k] = (response.status, json.loads(answer), time.monotonic())
            except Exception as err:  # a reset, a truncated body, an answer that is not JSON
                answers[k] = (repr(err), None, time.monotonic())
            finally:
                sent[k].set()
                connection.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        assert all(event.wait(60) for event in sent)
        time.sleep(0.1)  # sent is not yet read: the server's event loop accepts and reads them now
        signalled = time.monotonic()
        seconds = server.stop(signum)
        for t in threads:
            t.join(timeout=30)
        assert [a[0] for a in answers] == [200] * clients, ([a[0] for a in answers], server.log.read_text())
        assert all(a[1] == {"predictions": want} for a in answers)
        assert any(a[2] > signalled for a in answers), "every answer came before the signal: nothing was in flight"
        assert seconds < 10 and group_processes(server.process.pid) == []
        assert "Traceback" not in server.log.read_text(), server.log.read_text()
    finally:
        server.kill()


def test_decode_encodes_named_rows_with_strings_for_a_categorical_model():
    encoding = {"columns": ["Item", "rain"], "levels": {"Item": ["Maize", "Potatoes", "Rice, paddy"]}}
    model = LinearPredictor(
        {"linear.weight": torch.ones(1, 3), "linear.bias": torch.zeros(1)},
        {"feature_names": ["Item[T.Potatoes]", "Item[T.Rice, paddy]", "rain"], "target_names": ["y"],
         "in_features": 3, "out_features": 1, "encoding": encoding},
    )  # fmt: skip
    rows, _ = decode(body([{"Item": "Rice, paddy", "rain": 2.5}, ["Maize", 1]]), JSON, model)
    assert torch.equal(rows, torch.tensor([[0, 1, 2.5], [0, 0, 1]]))
    with pytest.raises(BadRequest, match="row 1, column 'Item': level 'Oats' was not in the training data") as info:
        decode(body([["Maize", 1], {"Item": "Oats", "rain": 1}]), JSON, model)
    assert info.value.status == 400
    with pytest.raises(BadRequest, match="row 0, column 'rain': missing value"):
        decode(body([{"Item": "Maize", "rain": None}]), JSON, model)
    # One policy with the numeric models and cropyield-predict --csv: other keys are ignored, a missing one is named.
    rows, _ = decode(body([{"region": "north", "Item": "Potatoes", "rain": 3.0}]), JSON, model)
    assert torch.equal(rows, torch.tensor([[1, 0, 3.0]]))
    with pytest.raises(BadRequest, match=r"row 0: missing \['rain'\]"):
        decode(body([{"Item": "Maize", "rainfall": 1}]), JSON, model)


@pytest.mark.slow
def test_a_model_with_categorical_columns_serves_named_rows_with_strings(tmp_path):
    from .test_encoding import TARGET, make_crops, write_crops

    write_crops(make_crops(600, areas=3, crops=3, seed=1), tmp_path / "yield.csv")
    run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", "yield.csv", "--data.target_names",
        f"[{TARGET}]", cwd=tmp_path)  # fmt: skip
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    row = {"Area": "Brazil", "Item": "Rice, paddy", "Year": 2001, "average_rain_fall_mm_per_year": 1100.5,
           "pesticides_tonnes": 120.0, "avg_temp": 21.5}  # fmt: skip
    printed = run("cropyield-predict", "--ckpt", checkpoint, *row.values(), "--json", cwd=tmp_path)
    server = Server(checkpoint, tmp_path / "serve.log")
    try:
        expected = json.loads(printed.stdout) * 2
        assert server.post({"rows": [row, list(row.values())]}) == (200, {"predictions": expected})
        status, answer = server.post({"rows": [row, {**row, "Item": "Oats"}]})
        assert status == 400 and "row 1, column 'Item': level 'Oats' was not in the training data" in answer["detail"]
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_serves_a_checkpoint_on_s3_as_the_same_checkpoint_on_disk(checkpoint, bucket, tmp_path, workers):
    url = upload(checkpoint, f"{bucket}/runs/last.ckpt")
    rows = [[75, 63, 44], [80, 70, 50], [-3.5, 1e3, 0]]
    want = expected(checkpoint, rows)  # the local file's model
    assert expected(url, rows) == want  # load_regressor reads the URL with the same checks
    server = Server(url, tmp_path / "server.log", "--workers", workers)
    try:
        for _ in range(2 * workers):  # each worker process loaded the model from the URL itself
            assert server.post({"rows": rows}) == (200, {"predictions": want})
        assert server.stop() < 10 and group_processes(server.process.pid) == []
    finally:
        server.kill()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()
