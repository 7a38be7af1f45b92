"""The ``cropyield-predict`` command: regions from the command line or a file in, yields out.

Reading the checkpoint and predicting are :mod:`cropyield.inference`'s; this module holds the
command's arguments and its output: the printed lines, ``--json``, and ``--out``, which keeps every
input column byte for byte beside the predictions and never replaces the input.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor, _brief, encode_inputs, prediction_table, records


def _parse_values(values: Sequence[str], count: int) -> list[list[float]]:
    if not values or len(values) % count:
        raise CropYieldError(f"expected groups of {count} values (one group per region), got {len(values)} value(s)")
    numbers = []
    for i, text in enumerate(values):
        try:
            numbers.append(float(text))
        except ValueError:
            raise CropYieldError(f"value {i + 1} ({text!r}) is not a number") from None
        if not torch.isfinite(torch.tensor(numbers[-1])):
            raise CropYieldError(f"value {i + 1} ({text!r}) is not a finite number")
    return [numbers[i : i + count] for i in range(0, len(numbers), count)]


def _refuse_overwriting(out: str, inputs: dict[str, str | None]) -> None:
    """``--out`` must name neither input: the same path, or another name of the same file (a link)."""
    for what, given in inputs.items():
        if given is None:
            continue
        same = os.path.realpath(out) == os.path.realpath(given)
        if not same and os.path.exists(out) and os.path.exists(given):
            same = os.path.samefile(out, given)
        if same:
            raise CropYieldError(f"--out {out} is the {what} ({given}); write the predictions to another file")


def _atomic_write(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it over ``path``:
    an error or a crash never leaves a half-written file, nor replaces an existing one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise CropYieldError(f"--out {path}: cannot be written ({_brief(err)})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _fields(values: Sequence[str]) -> str:
    """CSV fields joined by commas, quoted where needed (a name holding a comma or a quote)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="").writerow(values)
    return text.getvalue()


def _prediction_names(names: Sequence[str], inputs: Sequence[str]) -> list[str]:
    """The prediction columns' names, all prefixed ``predicted_`` (again, while needed) when the
    input already has a column of one of their names (a file with the targets in it)."""
    names = list(names)
    while set(names) & set(inputs):
        names = [f"predicted_{name}" for name in names]
    return names


def _csv_records(path: str):
    """The records of a CSV file as ``(raw text without its line end, line end)``, the header first.

    The raw text is what the file holds, byte for byte (a quoted field spanning lines included);
    blank lines, which are no record, are skipped as the readers skip them.
    """
    with open(path, encoding="utf-8", newline="") as f:
        consumed: list[str] = []

        def lines():
            for line in f:
                consumed.append(line)
                yield line

        for row in csv.reader(lines()):
            raw = "".join(consumed)
            consumed.clear()
            if not row:
                continue
            body = raw.rstrip("\r\n")
            yield body, raw[len(body) :] or "\n"


def _write_out(out: Path, args: argparse.Namespace, model: LinearPredictor, preds: torch.Tensor, targets) -> None:
    """``--out``: every input column as the input wrote it, then the ``targets`` columns of ``preds``
    (one per target, with its interval's bounds after it under ``--interval``)."""
    values = [[repr(v) for v in row] for row in preds.tolist()]
    if not args.csv:  # values from the command line: the text as typed
        n = len(model.input_names)
        typed = [args.values[i : i + n] for i in range(0, len(args.values), n)]
        header = model.input_names + _prediction_names(targets, model.input_names)
        lines = [_fields(header)] + [_fields(x + p) for x, p in zip(typed, values, strict=True)]
        _atomic_write(out, lambda f: f.write("\n".join(lines) + "\n"))
        return
    from cropyield.files import read_columns

    names = _prediction_names(targets, read_columns(args.csv))
    if Path(args.csv).suffix.lower() != ".csv":
        _atomic_write(out, lambda f: _write_parquet_rows(f, args.csv, names, values))
        return

    def write(f) -> None:
        records = _csv_records(args.csv)
        body, end = next(records)
        f.write(f"{body},{_fields(names)}{end}")
        count = 0
        for (body, end), p in zip(records, values, strict=False):
            f.write(f"{body},{','.join(p)}{end}")
            count += 1
        if count != len(values) or next(records, None) is not None:
            raise CropYieldError(f"{args.csv}: its records do not match the {len(values)} rows read (did it change?)")

    _atomic_write(out, write)


def _write_parquet_rows(f, path: str, names: list[str], values: list[list[str]]) -> None:
    """A Parquet file's every column, as Arrow writes each value as text, then the predictions."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow([*table.column_names, *names])
    columns = []
    for column in table.columns:
        try:
            columns.append(pc.cast(column, "string").to_pylist())
        except Exception:  # nested types have no cast to text: Python's text of the value
            columns.append([None if v is None else str(v) for v in column.to_pylist()])
    for i, p in enumerate(values):
        writer.writerow([*("" if c[i] is None else c[i] for c in columns), *p])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cropyield-predict",
        description="Predict crop yields for new regions from a cropyield checkpoint.",
        epilog="examples:\n  cropyield-predict --ckpt checkpoints/last.ckpt 75 63 44\n"
        "  cropyield-predict --ckpt checkpoints/last.ckpt 75 63 44 80 70 50 --json\n"
        "  cropyield-predict --ckpt checkpoints/last.ckpt --csv regions.csv --out predictions.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint file written by cropyield (e.g. checkpoints/last.ckpt)"
    )
    parser.add_argument(
        "values", nargs="*", help="input values, one group per region, in the checkpoint's feature order"
    )
    parser.add_argument("--csv", help="read regions from this CSV/Parquet file, columns chosen by feature name")
    parser.add_argument(
        "--out",
        help="write a CSV: every input column as the input wrote it, then one column per target "
        "(all prefixed predicted_ when the input has a column of one of their names); never the input file",
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON array, one object per region")
    parser.add_argument(
        "--units", help="unit printed after the yields (default: the one the checkpoint records; '' for none)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        metavar="LEVEL",
        help="also give each prediction's interval at this level (e.g. 0.95): <target>_lower and <target>_upper "
        "(exact least-squares checkpoints only)",
    )
    parser.add_argument(
        "--kind",
        choices=("prediction", "mean"),
        default="prediction",
        help="with --interval: where a new observation falls (prediction) or the expected value (mean)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``cropyield-predict``: errors are one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except CropYieldError as err:
        print(f"cropyield-predict: error: {err}", file=sys.stderr)
        sys.exit(2)


def _run(args: argparse.Namespace) -> None:
    if args.out:
        _refuse_overwriting(args.out, {"--csv input": args.csv, "checkpoint": args.ckpt})
    model = LinearPredictor.from_checkpoint(args.ckpt)
    if args.csv and args.values:
        raise CropYieldError("give input values or --csv, not both")
    if model.encoding:  # raw columns in, strings included; encoded as training did
        if args.csv:
            rows, x = _raw_csv(args.csv, model)
        else:
            rows = _groups(args.values, len(model.input_names))
            x = encode_inputs(model, rows, torch.float64)
    else:
        if args.csv:
            from cropyield.files import read_table

            x = torch.from_numpy(read_table(args.csv, model.feature_names))
        else:
            x = torch.tensor(_parse_values(args.values, len(model.feature_names)))
        rows = x.tolist()
    preds, names = prediction_table(model, x, args.interval, args.kind)
    if args.out:
        _write_out(Path(args.out), args, model, preds, names)
    units = model.units if args.units is None else args.units
    if args.json:
        print(json.dumps(records(preds, names)))
    elif not args.out:
        step = 3 if args.interval is not None else 1
        for r, p in zip(rows, preds.tolist(), strict=True):
            inputs = ", ".join(f"{n}={_shown(v)}" for n, v in zip(model.input_names, r, strict=True))
            yields = ", ".join(
                f"{n} {p[i * step]:.2f}" + (f" [{p[i * step + 1]:.2f}, {p[i * step + 2]:.2f}]" if step == 3 else "")
                for i, n in enumerate(model.target_names)
            )
            print(f"{inputs} -> {yields}" + (f" ({units})" if units else ""))
    else:
        print(f"wrote {len(preds)} predictions to {args.out}")


def _shown(value) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _groups(values: Sequence[str], count: int) -> list[list[str]]:
    if not values or len(values) % count:
        raise CropYieldError(f"expected groups of {count} values (one group per region), got {len(values)} value(s)")
    return [list(values[i : i + count]) for i in range(0, len(values), count)]


def _raw_csv(path: str, model: LinearPredictor) -> tuple[list[list], torch.Tensor]:
    """A file's input columns as raw rows (text kept) and encoded, for a model with categorical
    columns; a missing cell or an unseen level is an error naming the file, row and column."""
    from cropyield.cells import read_cells
    from cropyield.encoding import Coded
    from cropyield.files import check_columns, read_columns

    check_columns(path, model.input_names, read_columns(path))
    text = list(model.encoding["levels"])
    columns, where = read_cells(path, [c for c in model.input_names if c not in text], text)
    x, _, _ = Encoding.from_dict(model.encoding).encode(
        columns, where=where, hint="prediction needs every cell", dtype=np.float64
    )
    values = [
        [c.keys[k] for k in c.codes] if isinstance(c, Coded) else c.tolist()
        for c in (columns[name] for name in model.input_names)
    ]
    return [list(row) for row in zip(*values, strict=True)], torch.from_numpy(x)
