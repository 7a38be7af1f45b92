"""Reading tabular files (CSV, Parquet) into one float32 array, with one-line errors.

Only numpy and the standard library are imported here, so inference can read files without
Lightning. pyarrow (the ``arrow`` extra) is the fast reader: it measured fastest of numpy,
pandas, polars and pyarrow on this project's machine (see the README's benchmark). Without it,
CSV files are still read by the standard library, more slowly; Parquet needs it.

Every problem is reported as :class:`~cropyield.errors.CropYieldError` naming the file and, for
CSV, the line and column. The fast reader never reports errors itself: when it fails or yields a
non-finite value, the standard-library reader runs over the file to find the first bad cell.

A path may also be a URL (``s3://bucket/key``, ...): files are opened, listed and read in ranges
through :mod:`cropyield.storage`, and a transient network error retries the read.
"""

from __future__ import annotations

import atexit
import csv
import functools
import gc
import io
import math
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cropyield import storage
from cropyield.errors import CropYieldError

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_BLOCK = 16 << 20  # the most bytes of CSV parsed at a time (an eighth of the file, from 1 MB on)


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        return None
    import pyarrow.csv

    _collect_at_exit()
    return pyarrow


@functools.cache
def _collect_at_exit() -> None:
    # pyarrow's reader threads can still hold objects when the interpreter tears its modules down, and
    # then abort the finished process ("terminate called without an active exception", apache/arrow#34314):
    # one `cropyield-predict --csv` in five here. A collection at exit, registered after pyarrow's own exit
    # handlers (so it runs before them, while Arrow is whole), ends them cleanly.
    atexit.register(gc.collect)


def _kind(path: str | Path) -> str:
    suffix = storage.suffix(path)
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise CropYieldError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .parquet")


def _check_path(path: str | os.PathLike) -> str | Path:
    path = storage.location(path)
    found = storage.kind(path)
    if found == "missing":
        raise CropYieldError(f"{path}: no such file")
    if found == "dir":
        raise CropYieldError(f"{path}: is a directory, not a data file")
    return path


def _retried(path: str | Path, read):
    """``read()``; for a URL, retried while the network fails (see :func:`cropyield.storage.retried`)."""
    return storage.retried(str(path), read) if storage.is_url(path) else read()


def read_columns(path: str | os.PathLike) -> list[str]:
    """Returns the column names of a CSV or Parquet file, checking that they are unique.

    Raises:
        CropYieldError: the file is missing, unreadable, empty or has duplicate column names.
    """
    path = _check_path(path)
    names = _retried(path, lambda: _header(path))
    if not names:
        raise CropYieldError(f"{path}: the file is empty; expected a header line of column names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CropYieldError(f"{path}: duplicate column names {duplicates}; rename them so each is unique")
    return names


def _header(path: str | Path) -> list[str] | None:
    if _kind(path) == "parquet":
        return _parquet_file(path).schema_arrow.names
    try:
        with storage.open_text(path) as f:
            return next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        if storage.transient(path, err):
            raise
        raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None


def check_columns(path: str | os.PathLike, wanted: Sequence[str], available: Sequence[str]) -> None:
    """Raises a one-line error naming the columns of ``wanted`` that the file lacks."""
    missing = [c for c in wanted if c not in available]
    if missing:
        hint = ""
        if len(available) == 1 and any(d in available[0] for d in ";\t|"):
            hint = "; the file looks not comma-separated (cropyield reads comma-separated files)"
        raise CropYieldError(f"{path}: missing column(s) {missing}; the file has {list(available)}{hint}")


def read_table(path: str | os.PathLike, columns: Sequence[str], dtype=np.float32) -> np.ndarray:
    """Reads the named columns of a CSV or Parquet file into a C-contiguous float32 array.

    Args:
        path: a ``.csv`` (comma-separated, header line first) or ``.parquet`` file.
        columns: the columns to read, in the order wanted in the result.
        dtype: ``np.float32``, or ``np.float64`` to keep every digit of CSV text and Parquet doubles
            (the exact solver's reads).

    Returns:
        An array of shape ``[rows, len(columns)]``, every value finite.

    Raises:
        CropYieldError: naming the file and, where known, the line (CSV) or row (Parquet) and column.
    """
    path = _check_path(path)
    names = read_columns(path)
    check_columns(path, columns, names)
    if _kind(path) == "parquet":
        table = _retried(path, lambda: _read_parquet(path, columns, dtype))
    else:
        table = _retried(path, lambda: _read_csv(path, names, columns, dtype))
    if len(table) == 0:
        raise CropYieldError(f"{path}: has a header but no data rows")
    return table


def _brief(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _read_csv(path: Path, names: Sequence[str], columns: Sequence[str], dtype=np.float32) -> np.ndarray:
    pa = _pyarrow()
    if pa is None:
        return _read_csv_stdlib(path, columns, dtype)
    try:
        return _read_csv_arrow(pa, path, names, columns, dtype)
    except (pa.ArrowException, OSError, ValueError) as err:
        if storage.transient(path, err):
            raise
        # Slow, exact pass: raises naming the first bad line and column, or returns the rows.
        return _read_csv_stdlib(path, columns, dtype)


def _read_csv_arrow(pa, path: Path, names: Sequence[str], columns: Sequence[str], dtype=np.float32) -> np.ndarray:
    """pyarrow's multithreaded parser over blocks of lines, each copied into the result at once.

    The result is allocated once for the most rows the file can hold (a row takes at least two
    bytes a column); np.empty's pages become resident only as rows are written, and the unused
    tail is released at the end without a copy. Peak memory is the result plus one block, not the
    whole file plus its parse.
    """
    read_options = pa.csv.ReadOptions(column_names=list(names), use_threads=True)
    kind = _arrow_type(pa, dtype)
    convert = pa.csv.ConvertOptions(include_columns=list(columns), column_types=dict.fromkeys(columns, kind))
    size = storage.size(path)
    with storage.open_binary(path) as raw, io.BufferedReader(raw) if storage.is_url(path) else raw as f:
        f.readline()  # the header: its names were read by read_columns
        out = np.empty((size // (2 * len(names)) + 1, len(columns)), dtype=dtype)
        # One reused buffer: 16 MB bytes objects made and freed per block would fragment the heap
        # and keep most of the result's size again resident after the read.
        buffer, held, rows = bytearray(min(_BLOCK, max(_BLOCK // 16, size // 8))), 0, 0
        while True:
            with memoryview(buffer) as view:
                count = f.readinto(view[held:])
            end = held + count
            cut = _record_end(buffer, end) if count else end
            if count and not cut:  # a line longer than the buffer
                buffer.extend(bytes(len(buffer)))
                held = end
                continue
            if cut:
                with memoryview(buffer) as view:
                    table = _arrow_csv(pa, view[:cut], read_options, convert)
                for batch in table.to_batches():
                    block = out[rows : rows + batch.num_rows]
                    for j, name in enumerate(columns):
                        block[:, j] = _values(batch.column(name), dtype)
                    if not np.isfinite(block).all():  # NaN, inf, out of float32 range
                        raise ValueError("non-finite value")
                    rows += batch.num_rows
                del table
            if not count:
                out.resize((rows, len(columns)), refcheck=False)  # realloc: shrinks in place
                return out
            buffer[: end - cut] = buffer[cut:end]
            held = end - cut


def _record_end(data: bytes | bytearray, end: int) -> int:
    """Where the last whole CSV record of ``data[:end]`` ends (after its newline), 0 if none: the
    last newline outside quotes (``data`` starts outside them; a doubled quote leaves the count
    even). A cut at a newline inside a quoted value would make its tail a row of its own."""
    cut = data.rfind(b"\n", 0, end)
    quotes = data.count(b'"', 0, cut) if cut >= 0 else 0
    while quotes & 1:  # the newline is inside a quoted value: try the one before
        before = data.rfind(b"\n", 0, cut)
        if before < 0:
            return 0
        quotes -= data.count(b'"', before, cut)
        cut = before
    return cut + 1


def _arrow_csv(pa, data, read_options, convert_options):
    """pyarrow's parse of whole CSV records; a quoted value spanning lines (which its parallel
    chunker refuses, else it is faster) is parsed again allowing them."""
    try:
        return pa.csv.read_csv(pa.py_buffer(data), read_options=read_options, convert_options=convert_options)
    except pa.ArrowInvalid:
        parse = pa.csv.ParseOptions(newlines_in_values=True)
        return pa.csv.read_csv(
            pa.py_buffer(data), read_options=read_options, convert_options=convert_options, parse_options=parse
        )


def _arrow_type(pa, dtype):
    return pa.float64() if np.dtype(dtype) == np.float64 else pa.float32()


def _values(column, dtype=np.float32) -> np.ndarray:
    """A float Arrow array's values, without a copy (``to_numpy`` would import pandas: 0.3 s)."""
    if column.null_count:
        raise ValueError("empty value")
    size = np.dtype(dtype).itemsize
    return np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column), offset=size * column.offset)


def _read_csv_stdlib(path: Path, columns: Sequence[str], dtype=np.float32) -> np.ndarray:
    try:
        with storage.open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader)
            return _parse_csv_lines(path, f, header, columns, lines_before=1, dtype=dtype)
    except (UnicodeDecodeError, csv.Error) as err:
        raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None


def _parse_csv_lines(
    path: Path, lines, header: Sequence[str], columns: Sequence[str], lines_before: int, dtype=np.float32
) -> np.ndarray:
    """The slow, exact parse: raises naming the first bad line (counted from the file's start) and column."""
    wide = np.dtype(dtype) == np.float64
    values = [array("d" if wide else "f") for _ in columns]
    positions = [list(header).index(c) for c in columns]
    reader = csv.reader(lines)
    try:
        for row in reader:
            line = lines_before + reader.line_num
            if not row:  # a blank line, skipped as pyarrow does
                continue
            if len(row) != len(header):
                raise CropYieldError(
                    f"{path}, line {line}: expected {len(header)} values (one per column), got {len(row)}"
                )
            for out, name, k in zip(values, columns, positions, strict=True):
                out.append(_parse_cell(row[k], path, line, name, wide))
    except (UnicodeDecodeError, csv.Error) as err:
        raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None
    return np.stack([np.frombuffer(v, dtype=dtype) for v in values], axis=1).reshape(-1, len(columns))


def _parse_cell(cell: str, path: Path, line: int, column: str, wide: bool = False) -> float:
    where = f"{path}, line {line}, column {column!r}"
    if not cell.strip():
        raise CropYieldError(f"{where}: empty value; fill it in or drop the row")
    try:
        value = float(cell)
    except ValueError:
        raise CropYieldError(f"{where}: {cell[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise CropYieldError(f"{where}: {cell[:40]!r} is not a finite number")
    if abs(value) > _FLOAT32_MAX and not wide:
        raise CropYieldError(f"{where}: {cell[:40]!r} is out of float32 range")
    return value


def _parquet_file(path: Path):
    pa = _pyarrow()
    if pa is None:
        raise CropYieldError(f"{path}: reading Parquet needs pyarrow; install it with: pip install 'cropyield[arrow]'")
    import pyarrow.parquet as pq

    try:
        # Page checksums, where the writer stored them, catch corrupt data pages (else silent garbage).
        # A URL is opened for random access: the footer, then each row group, is a ranged read.
        source = storage.open_binary(path) if storage.is_url(path) else path
        return pq.ParquetFile(source, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        if storage.transient(path, err):
            raise
        raise CropYieldError(f"{path}: not a readable Parquet file ({_brief(err)})") from None


def _read_parquet(path: Path, columns: Sequence[str], dtype=np.float32) -> np.ndarray:
    pa = _pyarrow()
    file = _parquet_file(path)
    schema = file.schema_arrow
    for name in columns:
        kind = schema.field(name).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise CropYieldError(f"{path}, column {name!r}: has type {kind}, not a number")
    # One record batch at a time into the preallocated result: peak memory is the result plus a batch.
    out = np.empty((file.metadata.num_rows, len(columns)), dtype=dtype)
    start = 0
    try:
        for batch in file.iter_batches(columns=list(columns)):
            for j, name in enumerate(columns):
                values = batch.column(name).to_numpy(zero_copy_only=False)
                out[start : start + len(values), j] = values
            start += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        if storage.transient(path, err):
            raise
        raise CropYieldError(f"{path}: not a readable Parquet file ({_brief(err)})") from None
    _refuse_non_finite(out, path, 0, columns)
    return out


def data_files(path: str | os.PathLike) -> list[str | Path]:
    """A data file, or every ``.csv``/``.parquet`` file of a folder in sorted name order.

    Columns are read by name, so the files may hold them in any order (see :func:`check_files`).

    Raises:
        CropYieldError: the path is missing, the folder holds no data file, or a file's header is
            unreadable.
    """
    path = storage.location(path)
    found = storage.kind(path)
    if found == "missing":
        raise CropYieldError(f"{path}: no such file or folder")
    if found == "file":
        return [path]
    files = [p for p in storage.list_files(path) if storage.suffix(p) in CSV_SUFFIXES + PARQUET_SUFFIXES]
    if not files:
        raise CropYieldError(f"{path}: is a directory holding no .csv or .parquet file")
    for file in files:
        read_columns(file)  # a bad header fails now, naming its file
    return files


def check_files(files: Sequence[str | Path], wanted: Sequence[str], same_as: Sequence[str] | None = None) -> None:
    """Checks that every file holds the ``wanted`` columns, in any order; others are ignored.

    Args:
        files: the data files (a folder's, from :func:`data_files`).
        wanted: the columns read from every file.
        same_as: when the features were not named but taken from the first file's columns, those
            columns: every file must then hold the same set, as an extra column could be a feature.

    Raises:
        CropYieldError: naming the first file that lacks a wanted column (or, with ``same_as``,
            holds one more).
    """
    for file in files:
        names = read_columns(file)
        check_columns(file, wanted, names)
        extra = [c for c in names if c not in same_as] if same_as is not None else []
        if extra:
            raise CropYieldError(
                f"{file}: has column(s) {extra} that {storage.name(files[0])} lacks, so which columns are features "
                "is ambiguous; name them with feature_names (columns a file holds beyond them are then ignored)"
            )


def _refuse_non_finite(values: np.ndarray, path, first_row: int, columns: Sequence[str]) -> None:
    """Raises the one-line error naming the first non-finite value's row (counted from 1) and column."""
    if not _all_finite(values):
        row, j = map(int, np.argwhere(~np.isfinite(values))[0])
        raise CropYieldError(
            f"{path}, row {first_row + row + 1}, column {columns[j]!r}: value is empty, NaN, infinite or "
            "out of float32 range"
        )


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or infinity among the values: their extremes (NaN propagates), checked without the
    array of flags ``np.isfinite`` makes (new memory for every piece, zeroed by the kernel)."""
    return values.size == 0 or bool(np.isfinite(values.max()) and np.isfinite(values.min()))
