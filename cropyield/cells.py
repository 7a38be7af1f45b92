"""Reading raw cells: numbers that may be missing, and text (categorical) columns, from CSV and Parquet.

:mod:`cropyield.files` reads numbers only and refuses any empty cell, which is the fast path for
clean numeric data. Here a file (or one streamed piece of it) is read into the two column kinds of
:mod:`cropyield.encoding`: numeric columns as float64 with NaN where a cell is empty, null or NaN,
and text columns as :class:`~cropyield.encoding.Coded`. Only the columns asked for are read
(pyarrow's column projection for Parquet, ``include_columns`` for CSV). Without pyarrow, CSV is
read by the standard library. A quoted value such as ``"Rice, paddy"`` is one cell on every path.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cropyield import storage
from cropyield.encoding import Coded, Column
from cropyield.errors import CropYieldError
from cropyield.files import _arrow_csv, _brief, _kind, _parquet_file, _pyarrow, _retried, read_columns
from cropyield.pieces import Piece

_SNIFF_BYTES = 1 << 20


def text_columns(path: str | Path, columns: Sequence[str]) -> list[str]:
    """Which of ``columns`` hold text: Parquet by type; CSV by its first megabyte of rows, where
    most non-empty cells of a text column are not numbers (pyarrow also infers from a first block)."""
    if _kind(path) == "parquet":
        pa = _pyarrow()
        schema = _parquet_file(path).schema_arrow
        return [c for c in columns if not _is_numeric_type(pa, schema.field(c).type)]
    names = read_columns(path)
    positions = {c: names.index(c) for c in columns}
    words, cells = dict.fromkeys(columns, 0), dict.fromkeys(columns, 0)
    # The first megabyte, by one ranged read for a URL (a cut last character is replaced, its line skipped).
    head = _retried(path, lambda: storage.read_range(path, 0, min(storage.size(path), _SNIFF_BYTES)))
    lines = io.StringIO(head.decode("utf-8-sig", errors="replace"), newline="")
    reader = csv.reader(lines)
    next(reader, None)
    for row in reader:
        if len(row) != len(names):
            continue  # the last, cut line, or a bad one that the reading will name
        for column, k in positions.items():
            if row[k].strip():
                cells[column] += 1
                words[column] += not _is_number(row[k])
    # Mostly text: a category. A stray word in a column of numbers stays an error naming its line.
    return [c for c in columns if words[c] * 2 > cells[c]]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_numeric_type(pa, kind) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def read_cells(
    source: str | Path | Piece, numeric: Sequence[str], text: Sequence[str]
) -> tuple[dict[str, Column], Callable[[int], str]]:
    """Reads a whole file, or one piece of one, into numeric and text columns.

    Args:
        source: a CSV or Parquet file, or a :class:`~cropyield.pieces.Piece` of one.
        numeric: columns read as numbers (NaN where a cell is missing).
        text: columns read as text (categorical columns, whatever their type in the file).

    Returns:
        The columns by name, and a function naming row ``i`` of the result in a message.

    Raises:
        CropYieldError: the file is unreadable, or a numeric column holds text (naming file, row, column).
    """
    piece = source if isinstance(source, Piece) else None
    path = piece.path if piece else source
    first = piece.first_row if piece else 0

    def where(i: int) -> str:
        return f"{path}, row {first + i + 1}"

    if _kind(path) == "parquet":
        columns = _parquet_cells(path, piece, numeric, text)
    else:
        columns = _csv_cells(path, piece, numeric, text, where)
    if piece is not None:
        columns = {
            k: v.take(np.arange(piece.rows)) if isinstance(v, Coded) else v[: piece.rows] for k, v in columns.items()
        }
    return columns, where


def _parquet_cells(path: Path, piece: Piece | None, numeric, text) -> dict[str, Column]:
    pa = _pyarrow()
    file = _parquet_file(path)
    for name in numeric:
        kind = file.schema_arrow.field(name).type
        if not _is_numeric_type(pa, kind):
            raise CropYieldError(
                f"{path}, column {name!r}: has type {kind}, not a number (name it in categorical_names to encode it)"
            )
    wanted = [*numeric, *text]
    try:
        table = file.read_row_group(piece.row_group, columns=wanted) if piece else file.read(columns=wanted)
    except (pa.ArrowException, OSError) as err:
        raise CropYieldError(f"{path}: not a readable Parquet file ({_brief(err)})") from None
    return _arrow_columns(pa, table, numeric, text)


def _arrow_columns(pa, table, numeric, text) -> dict[str, Column]:
    import pyarrow.compute as pc

    out: dict[str, Column] = {}
    for name in numeric:
        column = table.column(name).cast(pa.float64(), safe=False).fill_null(math.nan)
        out[name] = column.to_numpy() if column.num_chunks != 1 else column.chunk(0).to_numpy(zero_copy_only=False)
    for name in text:
        column = table.column(name).combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        encoded = pc.dictionary_encode(column, null_encoding="encode")
        keys = [_text_key(v) for v in encoded.dictionary.to_pylist()]
        out[name] = Coded(keys, encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32))
    return out


def _text_key(value) -> str | None:
    from cropyield.encoding import level_key

    return level_key(value)


def _csv_cells(path: Path, piece: Piece | None, numeric, text, where) -> dict[str, Column]:
    names = read_columns(path)
    try:
        if piece is None:
            data = _retried(path, lambda: storage.read_range(path, 0, storage.size(path)))
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""  # the header: its names were read above
        else:
            data = _retried(path, lambda: storage.read_range(path, piece.start, piece.stop))
    except OSError as err:
        raise CropYieldError(f"{path}: cannot be read ({_brief(err)})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pa = _pyarrow()
    if pa is not None:
        try:
            table = _arrow_csv(
                pa,
                data,
                pa.csv.ReadOptions(column_names=names, use_threads=True),
                pa.csv.ConvertOptions(
                    include_columns=[*numeric, *text],
                    column_types={**dict.fromkeys(numeric, pa.float64()), **dict.fromkeys(text, pa.string())},
                    null_values=[""],
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                ),
            )
            return _arrow_columns(pa, table, numeric, text)
        except (pa.ArrowException, ValueError):
            pass  # the exact pass below names the bad line and column, or parses what pyarrow could not
    try:
        lines = io.StringIO(data.decode("utf-8"), newline="")
    except UnicodeDecodeError as err:
        raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None
    return _csv_cells_stdlib(path, lines, names, numeric, text, where)


def _csv_cells_stdlib(path: Path, lines, names, numeric, text, where) -> dict[str, Column]:
    numbers = {c: [] for c in numeric}
    texts = {c: [] for c in text}
    positions = {c: names.index(c) for c in [*numeric, *text]}
    reader = csv.reader(lines)
    row_index = 0
    try:
        for row in reader:
            if not row:  # a blank line, skipped as pyarrow does
                continue
            if len(row) != len(names):
                raise CropYieldError(
                    f"{where(row_index)}: expected {len(names)} values (one per column), got {len(row)}"
                )
            for column, values in numbers.items():
                cell = row[positions[column]]
                if not cell.strip():
                    values.append(math.nan)
                    continue
                try:
                    values.append(float(cell))
                except ValueError:
                    raise CropYieldError(
                        f"{where(row_index)}, column {column!r}: {cell[:40]!r} is not a number "
                        "(name it in categorical_names to encode it)"
                    ) from None
            for column, values in texts.items():
                values.append(row[positions[column]])
            row_index += 1
    except csv.Error as err:
        raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None
    out: dict[str, Column] = {c: np.asarray(v, dtype=np.float64) for c, v in numbers.items()}
    out.update({c: Coded.of(v) for c, v in texts.items()})
    return out
