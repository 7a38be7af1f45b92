"""Writes synthetic crop-yield rows from a known linear model plus noise, as CSV or Parquet.

Run from the repository root (needs the ``arrow`` extra):

    python scripts/make_data.py --rows 1000000 --out bench-data/crops-1M.csv
    python scripts/make_data.py --rows 100000 --features 7 --targets 3 --out data.parquet
    python scripts/make_data.py --rows 1e7 --files 8 --out bench-data/crops-1e7/   # a folder of Parquet files

Features are drawn around the tutorial's (temperature ~ 80, rainfall ~ 90, humidity ~ 55; more
features get generic names); targets are ``inputs @ W.T + b + noise`` with ``W, b`` the
least-squares fit of the tutorial's data for its 3 features and 2 targets (random otherwise), so
a model trained on the file can be checked against known weights.
"""

import argparse
from pathlib import Path

import numpy as np

from cropyield import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS
from cropyield.reference import least_squares


def make(rows: int, features: int = 3, targets: int = 2, noise: float = 1.0, seed: int = 0):
    """Returns ``(table, column names, weight, bias)`` with ``table`` float32 ``[rows, features + targets]``."""
    rng = np.random.default_rng(seed)
    means = np.array([80.0, 90.0, 55.0] + [50.0] * max(0, features - 3))[:features]
    stds = np.array([12.0, 30.0, 12.0] + [10.0] * max(0, features - 3))[:features]
    if (features, targets) == (3, 2):
        fit = least_squares(INPUTS, TARGETS)
        weight, bias = fit.weight.numpy(), fit.bias.numpy()
        names = [*FEATURE_NAMES, *TARGET_NAMES]
    else:
        weight, bias = rng.normal(0, 1, (targets, features)), rng.normal(0, 10, targets)
        names = [f"x{i}" for i in range(features)] + [f"y{j}" for j in range(targets)]
    table = np.empty((rows, features + targets), dtype=np.float32)
    for start in range(0, rows, 1 << 20):  # in chunks: float64 temporaries stay small
        stop = min(rows, start + (1 << 20))
        x = np.round(rng.normal(means, stds, (stop - start, features)), 2)
        y = x @ weight.T + bias + rng.normal(0, noise, (stop - start, targets))
        table[start:stop, :features], table[start:stop, features:] = x, np.round(y, 2)
    return table, names, weight, bias


def write(table: np.ndarray, names: list[str], out: Path, row_group_rows: int = 1 << 20) -> None:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    arrow = pa.table({name: table[:, j] for j, name in enumerate(names)})
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".parquet", ".pq"):
        pa.parquet.write_table(arrow, out, row_group_size=row_group_rows, write_page_checksum=True)
    else:
        with open(out, "wb") as f:
            f.write((",".join(names) + "\n").encode())
            pa.csv.write_csv(arrow, f, pa.csv.WriteOptions(include_header=False, quoting_style="none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=float, required=True, help="number of rows (1e6 is accepted)")
    parser.add_argument("--features", type=int, default=3, help="feature columns (default: 3, the tutorial's)")
    parser.add_argument("--targets", type=int, default=2, help="target columns (default: 2, the tutorial's)")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the targets' noise (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output file (.csv, .parquet), or a folder with --files"
    )
    parser.add_argument("--files", type=int, default=0, help="write a folder of this many files (default: one file)")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="file type with --files")
    parser.add_argument(
        "--row-group-rows", type=int, default=1 << 20, help="Parquet rows per row group (default: 2^20)"
    )
    args = parser.parse_args()
    rows = int(args.rows)
    if args.files:
        # Unequal sizes on purpose: file k holds a share proportional to k + 1.
        shares = np.arange(1, args.files + 1)
        bounds = np.concatenate([[0], np.cumsum(shares)]) * rows // shares.sum()
        for k in range(args.files):
            part, names, weight, bias = make(int(bounds[k + 1] - bounds[k]), args.features, args.targets, args.noise,
                                             args.seed + k)  # fmt: skip
            write(part, names, args.out / f"part-{k:03d}.{args.format}", args.row_group_rows)
        print(f"wrote {rows:,} rows in {args.files} files to {args.out}/")
        print(f"true weight {np.round(weight, 4).tolist()}, bias {np.round(bias, 4).tolist()}")
        return
    table, names, weight, bias = make(rows, args.features, args.targets, args.noise, args.seed)
    write(table, names, args.out, args.row_group_rows)
    print(f"wrote {len(table):,} rows x {len(names)} columns ({', '.join(names)}) to {args.out}")
    print(f"true weight {np.round(weight, 4).tolist()}, bias {np.round(bias, 4).tolist()}")


if __name__ == "__main__":
    main()
