"""Benchmark: ingest speed, training throughput, peak memory and the tutorial run end to end.

Run from the repository root (needs the ``bench`` extra: pyarrow, and pandas to compare with):

    python scripts/benchmark.py                       # N = 1e5, 1e6, 1e7 rows on the CPU
    python scripts/benchmark.py --rows 1e6 --device cuda --skip-tutorial
    python scripts/benchmark.py --sections exact streaming   # the exact solver; streaming (bench_exact.py)
    python scripts/benchmark.py --sections goals              # the exact solver's three figures, side by side

For each N, in a fresh process: the CSV (written by make_data.py, cached in bench-data/) is
read by cropyield, pyarrow, pandas and numpy.loadtxt, each in its own process; then training at
batch 65,536 is timed, best of three interleaved rounds: the Lightning Trainer over
CropYieldDataModule's fast path (with CropYieldRegressor, chunked or one batch a call, and with a
bare LightningModule), the best hand-written loop (randperm + index_select on one combined
tensor), the ceiling (contiguous slices, no shuffle), the naive ``X[idx], Y[idx]`` loop, and the
default ``DataLoader(TensorDataset, shuffle=True)``. On ``--device cuda`` the rows are moved to
the GPU once, and the Trainer also runs with ``cuda_graph=True``. Prints Markdown tables.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 65_536


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- ingest: each reader in its own process, so its peak memory is its own ---------------------

ARROW = "import pyarrow.csv as c, pyarrow as pa"
CONVERT = "convert_options=c.ConvertOptions(include_columns=cols, column_types=dict.fromkeys(cols, pa.float32()))"
READERS = {  # name: (imports, done before the clock starts; the read, into a float32 array where the reader can)
    "cropyield": ("from cropyield.files import read_table, _pyarrow; _pyarrow()", "out = read_table(path, cols)"),
    "pyarrow to numpy": (
        ARROW,
        f"t = c.read_csv(path, {CONVERT}); out = numpy.column_stack([t.column(n).to_numpy() for n in cols])",
    ),
    "pandas": ("import pandas as pd", "out = pd.read_csv(path, usecols=cols, dtype='float32', engine='c').to_numpy()"),
    "numpy.loadtxt": ("", "out = numpy.loadtxt(path, delimiter=',', skiprows=1, dtype='float32')"),
    "pyarrow table (no array)": (ARROW, f"out = c.read_csv(path, {CONVERT})"),
}
INGEST = """
import json, sys, time
import numpy
path, cols = sys.argv[1], sys.argv[2].split(",")
{imports}
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
base = status("VmRSS")
_start = time.perf_counter()
{code}
seconds = time.perf_counter() - _start
print(json.dumps({{"seconds": seconds, "base_mb": base, "peak_mb": status("VmHWM")}}))
"""


def ingest(path: Path, columns: list[str]) -> dict:
    results = {}
    for name, (imports, code) in READERS.items():
        script = INGEST.format(imports=imports, code=code)
        command = [sys.executable, "-c", script, str(path), ",".join(columns)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode == 0:
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


# --- training throughput ------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(step_batches, device, seconds: float) -> float:
    """Runs ``step_batches`` (a generator yielding batch sizes, one per step) for about ``seconds``
    after one warm-up step, and returns samples per second."""
    batches = step_batches()
    next(batches)
    _sync(device)
    start, samples = time.perf_counter(), 0
    for size in batches:
        samples += size
        if time.perf_counter() - start > seconds:
            break
    _sync(device)
    return samples / (time.perf_counter() - start)


def hand_written(kind: str, rows: torch.Tensor, f: int, device, lr: float = 1e-5):
    """Generators of training steps for the hand-written loops; each yields the batch size."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    def run():
        torch.manual_seed(0)
        model = torch.nn.Linear(f, rows.shape[1] - f).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x, y = rows[:, :f].contiguous(), rows[:, f:].contiguous()
        while True:
            if kind == "dataloader":
                loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), BATCH, shuffle=True)
                batches = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)) for xb, yb in loader)
            elif kind == "indexed":
                batches = ((x[i], y[i]) for i in torch.randperm(len(rows), device=device).split(BATCH))
            elif kind == "slices":  # the ceiling: no shuffle, no gather
                batches = ((b[:, :f], b[:, f:]) for b in rows.split(BATCH))
            else:
                batches = (
                    (b[:, :f], b[:, f:])
                    for b in (rows.index_select(0, i) for i in torch.randperm(len(rows), device=device).split(BATCH))
                )
            for xb, yb in batches:
                loss = F.mse_loss(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                yield len(xb)

    return run


def trainer_speed(
    rows: torch.Tensor, f: int, device, steps: int, bare: bool = False, per_call=None, graph: bool = False
) -> float:
    """Samples/s of ``Trainer.fit`` over CropYieldDataModule's fast path: with CropYieldRegressor
    (``per_call`` batches a training_step, None: chosen; ``graph``: each chunk's steps replayed as
    one CUDA graph), or (``bare``) with a minimal LightningModule and one batch a call, which shows
    what Lightning's own loop costs."""
    import lightning as L
    import torch.nn.functional as F

    from cropyield import CropYieldDataModule, CropYieldRegressor

    class Bare(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(f, rows.shape[1] - f)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.linear(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-5)

    class Clock(L.Callback):
        def __init__(self):
            self.samples, self.start = 0, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is None:  # the clock starts after the first call (warm-up)
                _sync(pl_module.device)
                self.start = time.perf_counter()
            else:
                self.samples += sum(len(x) for x, _ in batch) if isinstance(batch, list) else len(batch[0])

        def on_train_end(self, trainer, pl_module):
            _sync(pl_module.device)
            self.speed = self.samples / (time.perf_counter() - self.start)

    L.seed_everything(0, verbose=False)
    dm = CropYieldDataModule.from_tensors(
        rows[:, :f].cpu(), rows[:, f:].cpu(), batch_size=BATCH, seed=0, steps_per_call=1 if bare else per_call
    )
    clock = Clock()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=steps + 64, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock],
    )  # fmt: skip
    trainer.fit(Bare() if bare else CropYieldRegressor(f, rows.shape[1] - f, cuda_graph=graph), dm)
    return clock.speed


def quality(rows: torch.Tensor, f: int, device, epochs: int = 3) -> tuple[float, float]:
    """Final training MSE of a standardized fast-path run vs the least-squares optimum."""
    import lightning as L

    from cropyield import CropYieldDataModule, CropYieldRegressor
    from cropyield.solution import solve

    L.seed_everything(0, verbose=False)
    x, y = rows[:, :f].cpu(), rows[:, f:].cpu()
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=BATCH, standardize=True, seed=0)
    model = CropYieldRegressor(f, rows.shape[1] - f, lr=0.5, standardize=True)
    L.Trainer(
        accelerator=device.type, devices=1, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, dm)  # fmt: skip
    # The data module's QR factor (computed once for standardize) gives both numbers: no further pass.
    model, factor = model.cpu(), dm.statistics()
    scaled = factor.scaled(model.feature_mean, model.feature_std)
    final = float(scaled.mse(model.linear.weight.detach(), model.linear.bias.detach()).mean())
    return final, solve(factor).mse


def one(n: int, device: torch.device, seconds: float, data_dir: Path, skip_ingest: bool) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_data import make, write

    from cropyield.files import read_table

    path = data_dir / f"crops-{n:.0e}.csv".replace("+", "")
    if not path.exists():
        table, names, _, _ = make(n)
        write(table, names, path)
        del table
    columns = ["temp", "rainfall", "humidity", "apples", "oranges"]
    row = {"rows": n, "file_mb": path.stat().st_size / 1e6}
    if not skip_ingest:
        row["ingest"] = ingest(path, columns)
    rows = torch.from_numpy(read_table(path, columns)).to(device)
    f = 3
    # Three interleaved rounds, the best of each variant kept: this machine is shared and noisy.
    speeds = {}
    for _ in range(3):
        for kind in ("gathered", "indexed", "dataloader", "slices"):
            speed = timed_loop(hand_written(kind, rows, f, device), device, seconds / 3)
            speeds[kind] = max(speeds.get(kind, 0), speed)
        steps = max(10, int(seconds / 3 * speeds["gathered"] / BATCH))
        variants = [("trainer", False, None, False), ("trainer1", False, 1, False), ("bare", True, 1, False)]
        if device.type == "cuda":
            variants.append(("graph", False, None, True))
        for kind, bare, per_call, graph in variants:
            speed = trainer_speed(rows, f, device, steps, bare=bare, per_call=per_call, graph=graph)
            speeds[kind] = max(speeds.get(kind, 0), speed)
    row["speed"] = speeds
    row["final_mse"], row["optimum_mse"] = quality(rows, f, device)
    row["peak_rss_mb"] = rss_mb()
    return row


# --- the tutorial run end to end -----------------------------------------------------------------

PLAIN = """
import time, torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from cropyield.data import INPUTS, TARGETS  # two tensors; torch only
torch.manual_seed(42)
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=1e-5)
train_dl = DataLoader(TensorDataset(INPUTS, TARGETS), 5, shuffle=True)
steps = 0
for epoch in range(100):
    if epoch == 1:
        start = time.perf_counter()
    for xb, yb in train_dl:
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += epoch > 0
    if (epoch + 1) % 10 == 0:
        print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
print(f"Step time: {1e3 * (time.perf_counter() - start) / steps:.3f} ms per training step")
"""

BARE = """
import torch, torch.nn.functional as F, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from cropyield.data import INPUTS, TARGETS
from cropyield.callbacks import StepTimer
class Bare(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.linear(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-5)
L.seed_everything(42, verbose=False)
L.Trainer(max_epochs=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False, callbacks=[StepTimer()]).fit(
    Bare(), DataLoader(TensorDataset(INPUTS, TARGETS), 5, shuffle=True))
"""


def tutorial(workdir: Path) -> list[tuple[str, float, float]]:
    runs = [
        ("plain PyTorch script", [sys.executable, "-c", PLAIN]),
        ("bare Lightning loop", [sys.executable, "-c", BARE]),
        (
            "`cropyield fit --config tutorial.yaml`",
            [str(Path(sys.executable).parent / "cropyield"), "fit", "--config", "tutorial.yaml",
             "--trainer.callbacks+=cropyield.callbacks.StepTimer"],
        ),
    ]  # fmt: skip
    results = []
    for name, command in runs:
        start = time.perf_counter()
        out = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - start
        step_ms = float(out.split("Step time: ")[1].split(" ms")[0])
        results.append((name, wall, step_ms))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", type=float, nargs="+", default=[1e5, 1e6, 1e7], help="row counts (default: 1e5 1e6 1e7)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per training variant, over 3 rounds (default: 3)"
    )
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench-data", help="where the CSV files are cached")
    parser.add_argument("--skip-ingest", action="store_true", help="skip the readers' comparison")
    parser.add_argument("--skip-tutorial", action="store_true", help="skip the tutorial end-to-end runs")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["training", "exact", "streaming", "goals"],
        default=["training"],
        help="training: ingest, throughput, the tutorial run (default); exact: the exact solver against "
        "scikit-learn and numpy at 1e6 and 1e7 rows; streaming: a 1e7-row Parquet folder, and peak RSS on 5e7 rows; "
        "goals: the exact solver's three figures at 1e7 rows (against scikit-learn float64, the streamed pass against "
        "pyarrow's read, the HC pass's cost), side by side in 5 rounds",
    )
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(one(int(args.one), device, args.seconds, args.data_dir, args.skip_ingest)))
        return
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if {"exact", "streaming", "goals"} & set(args.sections):
        import bench_exact

        print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}\n")
        if "exact" in args.sections:
            bench_exact.exact([1_000_000, 10_000_000], args.data_dir)
        if "streaming" in args.sections:
            bench_exact.streaming(10_000_000, 50_000_000, args.data_dir)
        if "goals" in args.sections:
            bench_exact.goals(10_000_000, args.data_dir)
        if "training" not in args.sections:
            return
        print()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"Machine: {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, batch {BATCH:,}\n")

    rows = []
    for n in args.rows:
        command = [sys.executable, __file__, "--one", str(n), "--device", args.device, "--seconds", str(args.seconds),
                   "--data-dir", str(args.data_dir)] + (["--skip-ingest"] if args.skip_ingest else [])  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"benchmark of {n:.0e} rows failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    if not args.skip_ingest:
        print(
            "| rows | CSV MB | " + " | ".join(f"{k} MB/s" for k in READERS) + " | cropyield / fastest other array "
            "| cropyield peak RSS above the interpreter / final array |"
        )
        print("|---:" * (len(READERS) + 4) + "|")
        for r in rows:
            speed = {k: r["file_mb"] / v["seconds"] for k, v in r["ingest"].items()}
            others = max(v for k, v in speed.items() if k not in ("cropyield", "pyarrow table (no array)"))
            ours = r["ingest"]["cropyield"]
            array_mb = r["rows"] * 5 * 4 / 2**20
            print(
                f"| {r['rows']:.0e} | {r['file_mb']:.0f} | "
                + " | ".join(f"{speed.get(k, 0):.0f}" for k in READERS)
                + f" | {speed['cropyield'] / others:.2f}x | {(ours['peak_mb'] - ours['base_mb']) / array_mb:.2f}x |"
            )
        print()
    print(f"Training samples/s at batch {BATCH:,} on {args.device}, in millions:\n")
    print(
        "| rows | Trainer (fast path, chunked steps) | Trainer, chunks as CUDA graphs | Trainer, one batch a call "
        "| bare LightningModule, same batches | best hand-written (eager) | ceiling: contiguous slices, no shuffle "
        "| naive X[idx] | default DataLoader | best Trainer / best hand-written | best Trainer / DataLoader "
        "| final MSE, 3 epochs standardized | least-squares MSE | peak RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["speed"]
        best = max(s["trainer"], s.get("graph", 0))
        graph = f"{s['graph'] / 1e6:.2f}" if "graph" in s else "n/a (CUDA only)"
        print(
            f"| {r['rows']:.0e} | {s['trainer'] / 1e6:.2f} | {graph} | {s['trainer1'] / 1e6:.2f} "
            f"| {s['bare'] / 1e6:.2f} | {s['gathered'] / 1e6:.2f} | {s['slices'] / 1e6:.2f} | {s['indexed'] / 1e6:.2f} "
            f"| {s['dataloader'] / 1e6:.3f} | {best / s['gathered']:.2f}x "
            f"| {best / s['dataloader']:.0f}x "
            f"| {r['final_mse']:.4f} | {r['optimum_mse']:.4f} | {r['peak_rss_mb']:.0f} |"
        )
    if not args.skip_tutorial:
        import tempfile

        print("\nThe tutorial run end to end (whole processes; step time measured inside, first epoch excluded):\n")
        print("| run | process wall s | ms per training step |")
        print("|---|---:|---:|")
        with tempfile.TemporaryDirectory() as workdir:
            for name, wall, step in tutorial(Path(workdir)):
                print(f"| {name} | {wall:.2f} | {step:.3f} |")


if __name__ == "__main__":
    main()
