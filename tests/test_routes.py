"""Every route agrees: one matrix over the model variants, standardize, and the ways to fit and predict.

Fits: ``cropyield fit`` (each in its own folder) for every variant, in memory and streamed, with 1
and 2 DDP processes on the CPU; each must finish with exit code 0. ``standardize`` is on where
exactly one of "streamed" and "2 processes" holds, so every pair of settings (variant and
standardize included) meets in 12 fits rather than 24.

Predictions: the 1-process fits are the 6 checkpoints (3 variants, standardize off and on) whose
predictions for the training file's rows must agree, by every route, with a float64 reference
computed here from the checkpoint's weights, to float32 rounding: ``cropyield predict
--ckpt_path``, ``cropyield-predict`` (values, ``--csv``, ``--json``, ``--out``), ``load_regressor``
+ ``predict``, the HTTP server, the JSON and ONNX exports; and ``cropyield test --ckpt_path`` must
report the MSE of those predictions against the file's targets.

The training file is Parquet with row groups of 8 rows (several pieces, so that 2 streaming
processes have some each), holding the float32 values of a CSV text that ``cropyield-predict
--csv`` reads (with a region name to join on, and the columns in another order).
"""

import json
import math
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cropyield import load_regressor, predict
from cropyield.cli import cli_main
from cropyield.export import JsonPredictor
from cropyield.export import main as export_main
from cropyield.predict_cli import main as predict_main

from .conftest import BIN, run

pytestmark = pytest.mark.slow
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
pcsv = pytest.importorskip("pyarrow.csv")

VARIANTS = ("CropYieldRegressor", "ManualSGDRegressor", "LeastSquaresRegressor")
FEATURES, TARGETS = ["temp", "rainfall", "humidity"], ["apples", "oranges"]
FITS = [(v, streamed, processes) for v in VARIANTS for streamed in (False, True) for processes in (1, 2)]
U = 2.0**-24  # float32's unit roundoff


def standardized(streamed: bool, processes: int) -> bool:
    return streamed != (processes == 2)


@dataclass
class Data:
    folder: Path
    parquet: Path  # what the fits read
    regions: Path  # the same rows as CSV text, with a region name, in another column order
    texts: list[list[str]]  # each row's feature values as the CSV text writes them
    x: torch.Tensor  # float32 [rows, features]
    y: torch.Tensor  # float32 [rows, targets]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(16)
    n = 48
    x = np.c_[rng.normal(85, 10, n), rng.normal(90, 25, n), rng.normal(55, 10, n)].round(1)
    y = (x @ np.array([[0.4, 0.6, 0.1], [0.5, 0.3, 0.7]]).T - 20 + rng.normal(0, 1, (n, 2))).round(2)
    texts = [[f"{v:g}" for v in row] for row in x]
    rows = [",".join(t + [f"{v:g}" for v in ys]) for t, ys in zip(texts, y, strict=True)]
    lines = [",".join(FEATURES + TARGETS), *rows]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    float32 = pa.float32()
    table = pcsv.read_csv(
        folder / "train.csv",
        convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(FEATURES + TARGETS, float32)),
    )
    pq.write_table(table, folder / "train.parquet", row_group_size=8)
    regions = ["humidity,region,temp,rainfall"] + [f'{t[2]},"r{i}, north",{t[0]},{t[1]}' for i, t in enumerate(texts)]
    (folder / "regions.csv").write_text("\n".join(regions) + "\n")
    columns = [table.column(c).to_numpy() for c in FEATURES + TARGETS]
    values = torch.from_numpy(np.stack(columns, axis=1))
    assert values.dtype == torch.float32
    return Data(folder, folder / "train.parquet", folder / "regions.csv", texts, values[:, :3], values[:, 3:])


def fit_args(variant: str, standardize: bool) -> list[str]:
    flag = str(standardize).lower()
    if variant == "CropYieldRegressor":  # the shipped configs: fast.yaml standardizes
        return ["--config", "fast.yaml" if standardize else "tutorial.yaml", "--trainer.max_epochs", "2"]
    if variant == "ManualSGDRegressor":
        lr = "0.1" if standardize else "1e-5"
        return ["--model", variant, "--model.lr", lr, "--data.standardize", flag, "--trainer.max_epochs", "2"]
    return ["--config", "exact.yaml", "--data.standardize", flag]


@pytest.fixture(scope="module")
def fits(tmp_path_factory, data):
    """``fit(variant, streamed, processes)``: that fit's folder and result, run once per module."""
    done: dict = {}

    def fit(variant: str, streamed: bool, processes: int) -> tuple[Path, subprocess.CompletedProcess]:
        key = (variant, streamed, processes)
        if key not in done:
            folder = tmp_path_factory.mktemp(f"fit-{variant}-{'streamed' if streamed else 'memory'}-{processes}")
            args = [*fit_args(variant, standardized(streamed, processes)), "--data.data_path", data.parquet]
            args += ["--data.streaming", str(streamed).lower()]
            if processes > 1:
                args += ["--trainer.strategy", "ddp", "--trainer.devices", processes, "--trainer.accelerator", "cpu"]
            done[key] = folder, run("cropyield", "fit", *args, cwd=folder, check_rc=None, timeout=600)
        return done[key]

    return fit


def reference(ckpt: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's predictions in float64, from its weights alone, and a bound on the float32
    rounding of any route computing them (a few units of roundoff of the terms' magnitudes)."""
    checkpoint = torch.load(ckpt, weights_only=True)
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    w, b = state["linear.weight"].double(), state["linear.bias"].double()
    x = x.double()
    mean, std = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    if hparams["standardize"]:
        mean, std = state["feature_mean"].double(), state["feature_std"].double()
    expected = ((x - mean) / std) @ w.T + b
    bound = 16 * U * (((x.abs() + mean.abs()) / std) @ w.abs().T + b.abs())
    return expected, bound


@dataclass
class Trained:
    variant: str
    standardize: bool
    folder: Path
    ckpt: Path


@pytest.fixture(
    scope="module",
    params=[(v, s) for v in VARIANTS for s in (False, True)],
    ids=[f"{v}-{'standardized' if s else 'raw'}" for v in VARIANTS for s in (False, True)],
)
def trained(request, fits) -> Trained:
    variant, standardize = request.param
    folder, result = fits(variant, standardize, 1)  # 1 process: standardized when streamed
    assert result.returncode == 0, f"the fit failed:\n{result.stderr[-3000:]}"
    return Trained(variant, standardize, folder, folder / "checkpoints" / "last.ckpt")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(trained, data):
    """``cropyield-serve`` over the checkpoint: its port, once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "cropyield-serve"), "--ckpt", str(trained.ckpt), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                post(port, {"rows": data.x[:1].tolist()}, timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"cropyield-serve did not answer: {process.stderr.read()[-2000:]!r}") from None
                time.sleep(0.3)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def printed_yields(stdout: str) -> torch.Tensor:
    """The yields of ``cropyield-predict``'s lines ``temp=..., ... -> apples 57.32, oranges 69.54 (unit)``."""
    rows = []
    for line in stdout.splitlines():
        yields = re.sub(r" \(.*\)$", "", line.split(" -> ")[1])
        rows.append([float(part.rsplit(" ", 1)[1]) for part in yields.split(", ")])
    return torch.tensor(rows, dtype=torch.float64)


def csv_predictions(path: Path, count: int) -> torch.Tensor:
    lines = path.read_text().splitlines()[1:]
    return torch.tensor([[float(v) for v in line.split(",")[-count:]] for line in lines], dtype=torch.float64)


@dataclass
class Call:
    """What a route needs: the checkpoint, the rows, a folder of its own, captured output, fixtures."""

    trained: Trained
    data: Data
    tmp_path: Path
    capsys: pytest.CaptureFixture
    request: pytest.FixtureRequest

    @property
    def ckpt(self) -> str:
        return str(self.trained.ckpt)

    @property
    def values(self) -> list[str]:
        return [v for row in self.data.texts for v in row]

    def printed_json(self, argv: list[str]) -> torch.Tensor:
        self.capsys.readouterr()
        predict_main(argv)
        rows = json.loads(self.capsys.readouterr().out)
        return torch.tensor([[row[t] for t in TARGETS] for row in rows], dtype=torch.float64)


def lightningcli_predict(call: Call) -> torch.Tensor:
    out = call.tmp_path / "predictions.csv"
    args = ["--ckpt_path", call.ckpt, "--data.data_path", str(call.data.parquet), "--prediction_writer.output_path"]
    cli_main(["predict", *args, str(out), "--trainer.default_root_dir", str(call.tmp_path)])
    return csv_predictions(out, len(TARGETS))


def predict_command_values(call: Call) -> torch.Tensor:
    call.capsys.readouterr()
    predict_main(["--ckpt", call.ckpt, *call.values])
    return printed_yields(call.capsys.readouterr().out)


def predict_command_out(call: Call) -> torch.Tensor:
    predict_main(["--ckpt", call.ckpt, "--csv", str(call.data.regions), "--out", str(call.tmp_path / "out.csv")])
    return csv_predictions(call.tmp_path / "out.csv", len(TARGETS))


def http_server(call: Call) -> torch.Tensor:
    answer = post(call.request.getfixturevalue("server"), {"rows": call.data.x.tolist()})
    return torch.tensor([[row[t] for t in TARGETS] for row in answer["predictions"]], dtype=torch.float64)


def json_export(call: Call) -> torch.Tensor:
    export_main(["--ckpt", call.ckpt, "--format", "json", "--out", str(call.tmp_path / "m.json")])
    return torch.from_numpy(JsonPredictor.load(call.tmp_path / "m.json").predict(call.data.x.numpy())).double()


def onnx_export(call: Call) -> torch.Tensor:
    import onnxruntime

    export_main(["--ckpt", call.ckpt, "--format", "onnx", "--out", str(call.tmp_path / "m.onnx")])
    session = onnxruntime.InferenceSession(str(call.tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"features": call.data.x.numpy()})[0]).double()


# Each route's predictions for the training file's rows, float64 [rows, targets].
ROUTES = {
    "cropyield predict --ckpt_path": lightningcli_predict,
    "cropyield-predict values": predict_command_values,
    "cropyield-predict values --json": lambda call: call.printed_json(["--ckpt", call.ckpt, *call.values, "--json"]),
    "cropyield-predict --csv --json": lambda call: call.printed_json(
        ["--ckpt", call.ckpt, "--csv", str(call.data.regions), "--json"]
    ),
    "cropyield-predict --csv --out": predict_command_out,
    "load_regressor + predict": lambda call: predict(load_regressor(call.trained.ckpt), call.data.x).double(),
    "HTTP server": http_server,
    "JSON export": json_export,
    "ONNX export": onnx_export,
}


@pytest.mark.parametrize(
    ("variant", "streamed", "processes"), FITS, ids=[f"{v}-{'streamed' if s else 'memory'}-{p}proc" for v, s, p in FITS]
)
def test_fit_finishes_in_every_combination(fits, variant, streamed, processes):
    folder, result = fits(variant, streamed, processes)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr[-3000:]}"
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["cropyield"]["class"] == variant
    assert checkpoint["hyper_parameters"]["standardize"] is standardized(streamed, processes)


@pytest.mark.parametrize("route", ROUTES)
def test_route_predicts_what_the_checkpoint_holds(route, trained, data, request, capsys, tmp_path):
    expected, bound = reference(trained.ckpt, data.x)
    got = ROUTES[route](Call(trained, data, tmp_path, capsys, request))
    if route == "cropyield-predict values":  # printed to 2 decimals
        bound = bound + 0.005
    assert got.shape == expected.shape
    worst = ((got - expected).abs() / bound).max().item()
    assert worst <= 1, (
        f"{route}: off by {worst:.3g} times the rounding bound (max |error| {(got - expected).abs().max():.3g})"
    )


def test_cropyield_test_reports_the_mse_of_the_predictions(trained, data, tmp_path):
    expected, _ = reference(trained.ckpt, data.x)
    mse = float(((expected - data.y.double()) ** 2).mean())
    cli = cli_main(["test", "--ckpt_path", str(trained.ckpt), "--data.data_path", str(data.parquet),
                    "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    reported = float(cli.trainer.callback_metrics["test/mse"])
    assert math.isclose(reported, mse, rel_tol=1e-5), (reported, mse)
