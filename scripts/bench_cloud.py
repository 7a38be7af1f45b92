"""Benchmark: streaming from object storage against the same files on local disk, side by side.

Run from the repository root (needs the ``test`` extra: pyarrow, moto's server, s3fs):

    python scripts/bench_cloud.py                 # 1e6 rows in 10 Parquet files of 4 row groups
    python scripts/bench_cloud.py --rows 2e5 --rounds 1

Starts moto's S3 server on 127.0.0.1 (in this process; nothing leaves the machine), uploads a
folder of Parquet files, then times, alternating local disk and ``s3://`` in each round: the
exact least-squares fit (one streamed pass, ``exact.yaml``'s model and batch) and one epoch of
streamed SGD at batch 4,096 (with ``standardize``: its statistics pass included). Prints a
Markdown table of rows per second (best round) and the ratio. The local server is a single Python
process, so the figures bound what the streaming code costs per
request, not what a real object store would deliver.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(folder: Path, rows: int, files: int = 10, groups: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = rows // files
    for k in range(files):
        x = rng.normal(70, 15, (per_file, 3)).astype(np.float32)
        y = x @ np.array([[0.4, 0.9, -0.2], [0.6, 0.1, 0.5]], dtype=np.float32).T + rng.normal(0, 1, (per_file, 2))
        table = pa.table(
            {n: c for n, c in zip(["temp", "rainfall", "humidity"], x.T, strict=True)}
            | {n: c.astype(np.float32) for n, c in zip(["apples", "oranges"], y.T, strict=True)}
        )
        pq.write_table(table, folder / f"part-{k:02d}.parquet", row_group_size=per_file // groups)


def fit_seconds(data_path: str, exact: bool) -> float:
    import lightning as L

    from cropyield.data import CropYieldDataModule
    from cropyield.model import CropYieldRegressor, LeastSquaresRegressor

    batch = 131_072 if exact else 4096  # exact.yaml's batch: rows summarized per step
    dm = CropYieldDataModule(data_path=data_path, streaming=True, batch_size=batch, standardize=not exact, seed=1)
    model = (
        LeastSquaresRegressor(in_features=3, out_features=2)
        if exact
        else CropYieldRegressor(in_features=3, out_features=2, lr=0.05, standardize=True)
    )
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, default=1e6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = int(args.rows)

    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "d"
            write_folder(folder, rows)
            fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
            fs.create_dir("bench")
            for f in sorted(folder.iterdir()):
                with fs.open_output_stream(f"bench/d/{f.name}") as out:
                    out.write(f.read_bytes())
            places = {"local disk": str(folder), "S3 (local moto server)": "s3://bench/d/"}
            best = {(p, e): float("inf") for p in places for e in (True, False)}
            for _ in range(args.rounds):
                for exact in (True, False):
                    for place, path in places.items():
                        best[place, exact] = min(best[place, exact], fit_seconds(path, exact))
    finally:
        server.stop()
    train = rows // 10 * 10  # every row trains (val_fraction=0)
    print(f"\n{train:,} rows, 10 Parquet files x 4 row groups, best of {args.rounds}\n")
    print("| pass | local disk (rows/s) | S3, local server (rows/s) | S3 / local |")
    print("|---|---|---|---|")
    for exact, label in ((True, "exact least squares, one streamed pass"), (False, "SGD, one streamed epoch")):
        local, remote = best["local disk", exact], best["S3 (local moto server)", exact]
        print(f"| {label} | {train / local:,.0f} | {train / remote:,.0f} | {local / remote:.2f} |")


if __name__ == "__main__":
    main()
