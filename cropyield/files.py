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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
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


_ROWS_AT_ONCE = 1 << 16  # rows of a piece copied into its array together


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


# --- pieces: the units that streaming reads, shuffles and shards ---------------------------------


@dataclass(frozen=True)
class Piece:
    """A part of one data file that is read whole: a Parquet row group or a block of CSV lines.

    ``first_row`` is the 0-based position, among the file's data rows, of the piece's first row;
    ``rows`` its number of data rows (fewer than it holds when ``limit_rows`` cut it).
    """

    path: str
    file_index: int
    first_row: int
    rows: int
    row_group: int = 0  # Parquet
    start: int = 0  # CSV: byte range [start, stop), whole lines
    stop: int = 0
    lines_before: int = 0  # CSV: lines of the file before the piece (the header included)


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


def list_pieces(
    files: Sequence[str | Path], columns: Sequence[str], limit_rows: int | None = None, csv_block_bytes: int = _BLOCK
) -> list[Piece]:
    """The pieces of the files, in order: Parquet row groups (from the footer, no data read) and
    CSV blocks of about ``csv_block_bytes`` (their lines counted at disk speed, nothing parsed)."""
    pieces: list[Piece] = []
    remaining = limit_rows if limit_rows is not None else float("inf")
    for index, path in enumerate(files):
        names = read_columns(path)
        check_columns(path, columns, names)
        found = _retried(
            path,
            lambda path=path, index=index: (
                _parquet_pieces(path, index, columns)
                if _kind(path) == "parquet"
                else _csv_pieces(path, index, csv_block_bytes)
            ),
        )
        for piece in found:
            if remaining <= 0:
                return pieces
            if piece.rows > remaining:
                piece = replace(piece, rows=int(remaining))
            if piece.rows:
                pieces.append(piece)
                remaining -= piece.rows
    return pieces


def read_piece(
    piece: Piece, columns: Sequence[str], dtype=np.float32, order: str = "C", *, keep_float32: bool = False
) -> np.ndarray:
    """Reads the named columns of one piece into a float32 (or ``dtype``) array ``[piece.rows, len(columns)]``,
    row-major, or column-major where Arrow reads it with ``order="F"`` (a consumer that wants columns).
    ``keep_float32``: a Parquet piece whose columns are all float32 stays float32 whatever ``dtype``
    (for a consumer that widens the values itself, exactly: half the bytes to copy and check).

    Raises:
        CropYieldError: naming the file and, where known, the line (CSV) or row (Parquet) and column.
    """
    path = storage.location(piece.path)
    if _kind(path) == "parquet":

        def convert(pa, file):
            table = file.read_row_group(piece.row_group, columns=list(columns)).slice(0, piece.rows)
            # (a column at a time would hold less, but measured 1.6 times slower)
            kind = np.float32 if keep_float32 and _all_float32(pa, file, columns) else dtype
            return _table_to_array(pa, table, columns, kind, order)

        out = _row_group(path, piece, convert)
        _refuse_non_finite(out, path, piece.first_row, columns)
        return out
    try:
        data = _retried(path, lambda: storage.read_range(path, piece.start, piece.stop))
    except OSError as err:
        raise CropYieldError(f"{path}: cannot be read ({_brief(err)})") from None
    names = read_columns(path)
    pa = _pyarrow()
    out = None
    if pa is not None:
        try:
            table = _arrow_csv(
                pa,
                data,
                pa.csv.ReadOptions(column_names=names, use_threads=True),
                pa.csv.ConvertOptions(
                    include_columns=list(columns), column_types=dict.fromkeys(columns, _arrow_type(pa, dtype))
                ),
            )
            out = _table_to_array(pa, table, columns, dtype, order)
            if not _all_finite(out):
                out = None
        except (pa.ArrowException, ValueError):
            out = None
    if out is None:  # the exact pass names the bad line and column, or parses what pyarrow could not
        try:
            text = data.decode("utf-8-sig" if piece.start == 0 else "utf-8")
        except UnicodeDecodeError as err:
            raise CropYieldError(f"{path}: not a readable UTF-8 CSV file ({_brief(err)})") from None
        out = _parse_csv_lines(path, io.StringIO(text, newline=""), names, columns, piece.lines_before, dtype)
    return out[: piece.rows]


def read_piece_blocks(
    piece: Piece, columns: Sequence[str], dtype, blocks, *, keep_float32: bool = False
) -> Iterator[np.ndarray]:
    """The rows :func:`read_piece` reads, column-major, in consecutive blocks of ``blocks.rows`` rows
    (the last one shorter), each an array that ``blocks.take(rows, dtype)`` hands out (see
    :class:`cropyield.streaming.Blocks`: memory that earlier pieces used), yielded as each is filled
    and checked. A local Parquet row group is decoded a block's rows at a time on the calling thread
    (the consumer computes on the other cores), straight into the blocks, so the consumer starts on
    a piece's first block while the rest are decoded; a URL's is read whole first (a retry then
    starts again with nothing handed out); a CSV piece is parsed whole, then copied.
    """
    path = storage.location(piece.path)
    if _kind(path) != "parquet":
        yield from blocks.copied(read_piece(piece, columns, dtype, "F"))
        return

    def decoded(pa, file):
        kind = np.float32 if keep_float32 and _all_float32(pa, file, columns) else dtype
        # Arrow's batches (of its own sizes) are copied into the blocks wherever they fall.
        block, at, done = None, 0, 0  # the block being filled, its rows filled, the rows read
        wanted = {"row_groups": [piece.row_group], "columns": list(columns), "use_threads": False}
        for batch in file.iter_batches(blocks.rows, **wanted):
            table, start = pa.Table.from_batches([batch.slice(0, piece.rows - done)]), 0
            while start < table.num_rows:
                if block is None:
                    block, at = blocks.take(min(blocks.rows, piece.rows - done - start), kind), 0
                part = table.slice(start, len(block) - at)
                _table_to_array(pa, part, columns, kind, "F", out=block[at : at + part.num_rows])
                at, start = at + part.num_rows, start + part.num_rows
                if at == len(block):
                    yield block
                    block = None
            done += table.num_rows
            if done == piece.rows:  # (fewer rows than the row group's: a row limit)
                break

    if storage.is_url(path):
        out = iter(_row_group(path, piece, lambda pa, file: list(decoded(pa, file))))
    else:
        out = _reporting_unreadable(path, piece, lambda pa: decoded(pa, _parquet_file(path)))
    first = piece.first_row
    for block in out:
        _refuse_non_finite(block, path, first, columns)
        first += len(block)
        yield block


def _all_float32(pa, file, columns: Sequence[str]) -> bool:
    schema = file.schema_arrow
    return all(schema.field(c).type == pa.float32() for c in columns)


def _row_group(path, piece: Piece, convert):
    """``convert(pa, file)`` for a Parquet piece's file, unreadable data reported in one line
    naming the file and the piece's row group."""
    pa = _pyarrow()

    def read():
        try:
            return convert(pa, _parquet_file(path))
        except (pa.ArrowException, OSError, ValueError) as err:
            raise _unreadable(path, piece, err) from None

    return _retried(path, read)


def _reporting_unreadable(path, piece: Piece, blocks):
    """Yields from ``blocks(pa)``, unreadable data reported as :func:`_row_group` reports it."""
    pa = _pyarrow()
    try:
        yield from blocks(pa)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _unreadable(path, piece, err) from None


def _unreadable(path, piece: Piece, err: Exception) -> Exception:
    """A network error as it is (to be retried); any other: the one-line error naming the row group."""
    if storage.transient(path, err):
        return err
    return CropYieldError(f"{path}: not a readable Parquet file (row group {piece.row_group}: {_brief(err)})")


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


def _table_to_array(pa, table, columns: Sequence[str], dtype=np.float32, order: str = "C", out=None) -> np.ndarray:
    """An Arrow table's columns copied once into a float32 (or ``dtype``) array, or into ``out``
    (``[rows, columns]`` of that dtype); empty cells raise ValueError.

    Written a block of rows at a time, so each block stays in cache while its columns are filled
    in (a column at a time over a whole piece measured 5x slower); float32 values are widened to
    float64 by that copy itself (exactly), not by a cast first.
    """
    out = np.empty((table.num_rows, len(columns)), dtype=dtype, order=order) if out is None else out
    kind, single = _arrow_type(pa, dtype), pa.float32()
    for start in range(0, table.num_rows, _ROWS_AT_ONCE):
        block = table.slice(start, _ROWS_AT_ONCE)
        for j, name in enumerate(columns):
            at = start
            for chunk in block.column(name).chunks:
                if chunk.type not in (kind, single):
                    chunk = chunk.cast(kind, safe=False)  # out of float32's range: inf, refused later
                if chunk.null_count:
                    chunk = chunk.fill_null(float("nan"))  # an empty cell: NaN, refused later with its row
                values = _values(chunk, np.float32 if chunk.type == single else dtype)
                out[at : at + len(chunk), j] = values
                at += len(chunk)
    return out


def _parquet_pieces(path: str | Path, index: int, columns: Sequence[str]) -> list[Piece]:
    pa = _pyarrow()
    file = _parquet_file(path)
    for name in columns:
        kind = file.schema_arrow.field(name).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise CropYieldError(f"{path}, column {name!r}: has type {kind}, not a number")
    pieces, first = [], 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        pieces.append(Piece(str(path), index, first, rows, row_group=group))
        first += rows
    return pieces


def _csv_pieces(path: str | Path, index: int, block_bytes: int) -> list[Piece]:
    """Cuts a CSV file into blocks of whole lines and counts each block's data (non-blank) lines."""
    pieces = []
    size = storage.size(path)
    with storage.open_binary(path) as raw, io.BufferedReader(raw) if storage.is_url(path) else raw as f:
        start = len(f.readline())  # the header
        lines_before, first_row = 1, 0
        while start < size:
            f.seek(start)
            data = f.read(block_bytes)
            line_ends = _line_ends(data)
            while not len(line_ends) and start + len(data) < size:
                data += f.read(block_bytes)  # a line longer than a block
                line_ends = _line_ends(data)
            end = start + len(data)
            cut = int(line_ends[-1]) + 1 if end < size else len(data)
            view = np.frombuffer(data, dtype=np.uint8, count=cut)
            newlines = line_ends[line_ends < cut]
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [cut]])
            if starts[-1] == cut:  # the block ends with a newline: no unterminated last line
                starts, ends = starts[:-1], ends[:-1]
            length = ends - starts
            blank = (length == 0) | ((length == 1) & (view[np.minimum(starts, cut - 1)] == 13))
            rows = int(len(starts) - blank.sum())
            pieces.append(
                Piece(str(path), index, first_row, rows, start=start, stop=start + cut, lines_before=lines_before)
            )
            first_row += rows
            lines_before += len(newlines)
            start += cut
    return pieces


def _line_ends(data: bytes) -> np.ndarray:
    """Positions of the newlines that end CSV records: not those inside a quoted value (a block
    starts outside quotes, and a doubled quote inside one leaves the count even)."""
    view = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(view == 10)
    if not len(newlines) or data.find(b'"', 0, int(newlines[-1])) < 0:
        return newlines
    inside = np.cumsum(view == 34, dtype=np.int64)[newlines] & 1
    return newlines[inside == 0]
