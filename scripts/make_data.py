"""Writes synthetic crop-yield rows from a known linear model plus noise, as CSV or Parquet.

Run from the repository root (needs the ``arrow`` extra):

    python scripts/make_data.py --rows 1000000 --out bench-data/crops-1M.csv
    python scripts/make_data.py --rows 100000 --features 7 --targets 3 --out data.parquet
    python scripts/make_data.py --rows 1e7 --files 8 --out bench-data/crops-1e7/   # a folder of Parquet files
    python scripts/make_data.py --rows 6000 --areas 8 --crops 4 --missing 40 --out yield.csv  # a crop table
    python scripts/make_data.py --rows 6000 --areas 8 --crops 4 --by-crop --out yield/  # one file per crop

Features are drawn around the tutorial's (temperature ~ 80, rainfall ~ 90, humidity ~ 55; more
features get generic names); targets are ``inputs @ W.T + b + noise`` with ``W, b`` the
least-squares fit of the tutorial's data for its 3 features and 2 targets (random otherwise), so
a model trained on the file can be checked against known weights.

With ``--crops``, the table is shaped like the public crop-yield table instead: ``Area`` and
``Item`` (text: categorical columns, ``"Rice, paddy"`` among the crops), ``Year``, rainfall,
pesticides and temperature, and ``hg/ha_yield`` from a per-crop and per-area effect plus a linear
term and noise; ``--missing N`` empties N cells of the inputs, in N different rows.
"""

import argparse
from pathlib import Path

import numpy as np

from cropyield import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS
from cropyield.solution import least_squares


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


AREAS = ("Albania", "Brazil", "Burundi", "India", "Kenya", "Mexico", "Peru", "Spain", "Turkey", "Zambia")
CROPS = ("Maize", "Potatoes", "Rice, paddy", "Wheat", "Cassava", "Sorghum", "Soybeans", "Yams")
CROP_COLUMNS = ("Area", "Item", "Year", "average_rain_fall_mm_per_year", "pesticides_tonnes", "avg_temp", "hg/ha_yield")
CROP_YIELD = (30_000.0, 180_000.0, 45_000.0, 32_000.0, 110_000.0, 15_000.0, 22_000.0, 95_000.0)  # hg/ha
NUMERIC_EFFECTS = {"Year": 150.0, "average_rain_fall_mm_per_year": 5.0, "pesticides_tonnes": 0.5, "avg_temp": -400.0}


def make_crops(rows: int, areas: int = 8, crops: int = 4, missing: int = 0, seed: int = 0) -> dict[str, list]:
    """A crop-shaped table as columns of Python values (text, numbers; None for an empty cell)."""
    if not 1 <= areas <= len(AREAS) or not 1 <= crops <= len(CROPS):
        raise SystemExit(f"--areas must be 1 to {len(AREAS)} and --crops 1 to {len(CROPS)}")
    rng = np.random.default_rng(seed)
    area, item = rng.integers(0, areas, rows), rng.integers(0, crops, rows)
    area_effect = rng.normal(0, 8_000, areas)
    numbers = {
        "Year": rng.integers(1990, 2014, rows).astype(float),
        "average_rain_fall_mm_per_year": np.round(rng.gamma(4.0, 280.0, rows), 1),
        "pesticides_tonnes": np.round(rng.lognormal(6.0, 1.5, rows), 2),
        "avg_temp": np.round(rng.normal(20.0, 6.0, rows), 2),
    }
    y = np.asarray(CROP_YIELD)[item] + area_effect[area] - 150.0 * 1990 + rng.normal(0, 3_000, rows)
    for name, effect in NUMERIC_EFFECTS.items():
        y = y + effect * numbers[name]
    columns = {"Area": [AREAS[a] for a in area], "Item": [CROPS[c] for c in item]}
    columns.update({name: values.tolist() for name, values in numbers.items()})
    columns["Year"] = [int(v) for v in columns["Year"]]
    columns["hg/ha_yield"] = np.round(y).tolist()
    inputs = CROP_COLUMNS[:-1]
    for row in rng.choice(rows, size=min(missing, rows), replace=False):  # one empty cell in each of N rows
        columns[inputs[rng.integers(0, len(inputs))]][row] = None
    return columns


def write_crops(columns: dict[str, list], out: Path) -> None:
    """Writes a crop table as CSV (``"Rice, paddy"`` quoted, empty cells empty) or Parquet (nulls)."""
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet

        pa.parquet.write_table(pa.table(columns), out, write_page_checksum=True)
        return
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in zip(*columns.values(), strict=True))


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
    parser.add_argument("--crops", type=int, default=0, help="write a crop-shaped table with this many crops")
    parser.add_argument("--areas", type=int, default=8, help="areas (countries) of the crop table (default: 8)")
    parser.add_argument("--missing", type=int, default=0, help="empty cells of the crop table, one per row")
    parser.add_argument("--by-crop", action="store_true", help="write the crop table as a folder, one file per crop")
    args = parser.parse_args()
    rows = int(args.rows)
    if args.crops:
        columns = make_crops(rows, args.areas, args.crops, args.missing, args.seed)
        if args.by_crop:
            suffix = "parquet" if args.format == "parquet" else "csv"
            for k, crop in enumerate(CROPS[: args.crops]):
                # A row whose crop cell is empty goes with the first crop.
                mine = [i for i, item in enumerate(columns["Item"]) if item == crop or (k == 0 and item is None)]
                part = {name: [values[i] for i in mine] for name, values in columns.items()}
                write_crops(part, args.out / f"crop-{k}.{suffix}")
            print(f"wrote {rows:,} rows in {args.crops} files, one per crop, to {args.out}/")
        else:
            write_crops(columns, args.out)
            print(f"wrote {rows:,} rows x {len(columns)} columns ({', '.join(columns)}) to {args.out}")
        return
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
