"""The pieces of data files that streaming reads, shuffles and shards, with one-line errors.

A piece is a Parquet row group or a block of whole CSV lines (about 16 MB), read whole: into one
array (:func:`read_piece`) or, for the exact solver's pass, into reused blocks of whole batches as
Arrow decodes them (:func:`read_piece_blocks`). Listing them (:func:`list_pieces`) reads only the
Parquet footers and counts the CSV lines, at disk speed. Errors name the file and, where known,
the line (CSV) or row (Parquet) and column, as :mod:`cropyield.files` does for whole files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cropyield import storage
from cropyield.errors import CropYieldError
from cropyield.files import (
    _BLOCK,
    _all_finite,
    _arrow_csv,
    _arrow_type,
    _brief,
    _kind,
    _parquet_file,
    _parse_csv_lines,
    _pyarrow,
    _refuse_non_finite,
    _retried,
    _values,
    check_columns,
    read_columns,
)

_ROWS_AT_ONCE = 1 << 16  # rows of a piece copied into its array together


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
