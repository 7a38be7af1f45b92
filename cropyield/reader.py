"""Reading the data set as the data module's settings say: a table at once, or pieces after a first pass.

:class:`RowReader` builds the :mod:`cropyield.sources` of each stage. Clean numbers take the fast
numeric readers of :mod:`cropyield.files`; raw cells (text, missing values) are read by
:mod:`cropyield.cells` and encoded by :mod:`cropyield.encoding`. Streaming, a first pass over the
pieces (:func:`survey`) learns the levels and counts the rows each piece keeps (under DDP each
process reads its share and what they found is gathered), then the pieces are read as they are
served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import torch

from cropyield.cells import read_cells
from cropyield.encoding import Coded, Column, Encoding, check_levels, drop_message, learn_levels, missing_mask
from cropyield.errors import CropYieldError
from cropyield.files import read_table
from cropyield.pieces import Piece, list_pieces, read_piece
from cropyield.sources import RowSource, StreamedSource, TableSource
from cropyield.streaming import StreamSource, held_out, read_ahead

MIN_ROWS = 2


@dataclass
class Layout:
    """What to read and how: raw inputs, targets, which inputs are categorical, missing cells."""

    inputs: Sequence[str]
    targets: Sequence[str]
    text: Sequence[str]
    missing: str = "error"
    hint: str = "fill it in or drop the row (missing: drop)"  # what a missing cell's message says to do

    @property
    def numeric(self) -> list[str]:
        return [c for c in (*self.inputs, *self.targets) if c not in self.text]

    @property
    def used(self) -> list[str]:
        return [*self.inputs, *self.targets]


class RowReader:
    """The data set's rows, read and encoded as the data module's settings say.

    Clean numbers (no categorical column, ``missing="error"``) take the fast numeric readers of
    :mod:`cropyield.files`, exactly as before categorical support; raw cells (text, missing values)
    are read by :mod:`cropyield.cells` and encoded by :mod:`cropyield.encoding`.

    Args:
        name: the data set in messages (a path, "the given tensors", "the embedded data").
        files: the data files, or None for in-memory rows.
        memory: ``(column names, float table)`` of in-memory rows.
        layout: the columns used and how missing cells are handled.
        limit_rows: read only the first N rows.
        val_fraction: rows held out for validation.
        streaming: serve pieces as they are read, rather than one table.
        max_levels: the most levels a categorical column may have.
    """

    def __init__(self, name, files, memory, layout: Layout, limit_rows, val_fraction, streaming, max_levels) -> None:
        self.name, self.files, self.memory, self.layout = name, files, memory, layout
        self.limit_rows, self.val_fraction, self.streaming, self.max_levels = (
            limit_rows,
            val_fraction,
            streaming,
            max_levels,
        )
        self.raw = bool(layout.text) or (layout.missing == "drop" and files is not None)
        self.dropped: str | None = None  # the line saying which rows a missing cell dropped
        self._learned: tuple[dict, np.ndarray] | Survey | None = None  # what learning the levels read

    def learn(self, seed: int, rank: int = 0, world: int = 1, given: dict | None = None) -> Encoding:
        """Learns the categorical columns' levels from the training rows, in one pass (``given``
        levels are taken as they are).

        Streaming with ``world > 1`` (from ``setup``, where every process is), each process reads
        its share of the pieces and what they found is gathered; otherwise the pass reads every
        piece, so that every process finds the same levels before the processes are connected
        (the model's size depends on them). In memory, the pass is reading the table, whose raw
        columns are kept for :meth:`fit_source`.
        """
        layout, given = self.layout, dict(given or {})
        if self.streaming:
            self._learned = found = self._survey(self._pieces(layout.used), seed, rank, world)
            found = {c: v for c, v in found.found.items() if c not in given}
        else:
            columns, keep = self._learned = self._raw_columns(layout.used, layout.missing)
            train_rows, _ = split_rows(int(keep.sum()), self.val_fraction, seed)
            kept = np.flatnonzero(keep)
            train = kept if train_rows is None else kept[train_rows.numpy()]
            found = {c: columns[c].present(train) for c in layout.text if c not in given}
        levels = {**learn_levels(found, self.max_levels, self.name), **given}
        return Encoding(tuple(layout.inputs), {c: tuple(levels[c]) for c in layout.inputs if c in levels})

    def fit_source(
        self, encoding: Encoding, seed: int, fast_path_min_rows: int, rank: int = 0, world: int = 1, dtype=torch.float32
    ) -> RowSource:
        """The training rows and the held-out ones (the same rows when none are held out), in
        ``dtype`` (float64: the exact solver's reads); a first pass that is still to be made
        (streaming, ``missing="drop"``) is shared by the processes."""
        layout, width = self.layout, len(encoding.feature_names)
        if self.streaming:
            pieces = self._pieces(layout.used)
            if not self.raw:
                stream = StreamSource(pieces, layout.used, self.val_fraction, seed, dtype)
            else:
                found = self._learned
                if not isinstance(found, Survey):
                    self._learned = found = self._survey(pieces, seed, rank, world)
                names = [*encoding.feature_names, *layout.targets]
                read, counts = encoded_reader(layout, encoding), (found.train_counts, found.val_counts)
                stream = StreamSource(pieces, names, self.val_fraction, seed, dtype, read=read, counts=counts)
            train, held = sum(stream.train_counts), sum(p.rows for p in pieces) - sum(stream.train_counts)
            if self.raw:
                held = sum(stream.val_counts) if self.val_fraction > 0 else held
            if train < MIN_ROWS or (self.val_fraction > 0 and held < MIN_ROWS):
                raise CropYieldError(
                    f"{self.name}: {train} training and {held} held-out rows are too few (need at least "
                    f"{MIN_ROWS} of each)"
                )
            return StreamedSource(stream, width)
        if isinstance(self._learned, tuple):  # the raw columns read to learn the levels: encoded once
            (columns, _), self._learned = self._learned, None
            rows = self._encode(columns, encoding, layout, dtype)
        else:
            rows = self._rows(layout, encoding, dtype)
        train, held = self._split(rows, seed)
        return TableSource(train, held, width, fast_path_min_rows)

    def predict_source(self, encoding: Encoding, targets: Sequence[str], seed: int, fast_path_min_rows: int):
        """Every row, in order; a missing cell is an error (prediction never drops a row)."""
        layout = Layout(self.layout.inputs, targets, self.layout.text, "error", "prediction needs every cell")
        width = len(encoding.feature_names)
        if self.streaming:
            pieces = self._pieces(layout.used)
            if not self.raw:
                return StreamedSource(StreamSource(pieces, layout.used, 0.0, seed), width, "all")
            names = [*encoding.feature_names, *targets]
            counts = ([0] * len(pieces), [p.rows for p in pieces])
            stream = StreamSource(pieces, names, 0.0, seed, read=encoded_reader(layout, encoding), counts=counts)
            return StreamedSource(stream, width, "all")
        rows = self._rows(layout, encoding)
        return TableSource(rows, rows, width, fast_path_min_rows)

    def _survey(self, pieces: Sequence[Piece], seed: int, rank: int = 0, world: int = 1) -> Survey:
        shared = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        mine = [i for i in range(len(pieces)) if i % world == rank] if shared else None
        found = survey(pieces, self.layout, self.val_fraction, seed, self.max_levels, mine, self.name)
        if shared:  # every process reads its share, then they all gather what the others found
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, found)
            found = reduce(Survey.merge, gathered)
        if self.layout.missing == "drop":
            counts = {c: found.missing[c] for c in self.layout.used if c in found.missing}  # in column order
            self.dropped = drop_message(counts, found.dropped, found.rows)
        return found

    def _pieces(self, wanted: Sequence[str]) -> list[Piece]:
        # Categorical columns may hold text: the type check of the pieces is for the numeric ones.
        return list_pieces(self.files, [c for c in wanted if c not in self.layout.text], self.limit_rows)

    def _raw_columns(self, wanted: Sequence[str], missing: str) -> tuple[dict[str, Column], np.ndarray]:
        """Every row's raw columns (files or tensors) and the mask of the rows kept."""
        layout = Layout(self.layout.inputs, wanted[len(self.layout.inputs) :], self.layout.text, missing)
        if self.files is not None:
            parts = [read_cells(p, layout.numeric, layout.text)[0] for p in self._pieces(wanted)]
            columns = {}
            for name in parts[0]:
                values = [part[name] for part in parts]
                columns[name] = Coded.concat(values) if isinstance(values[0], Coded) else np.concatenate(values)
        else:
            names, table = self.memory
            array = table[: self.limit_rows].numpy()
            columns = {
                n: Coded.of(array[:, j].tolist()) if n in layout.text else array[:, j].astype(np.float64)
                for j, n in enumerate(names)
                if n in wanted
            }
        keep = np.ones(len(next(iter(columns.values()))), dtype=bool)
        if missing == "drop":
            for name in wanted:
                keep &= ~missing_mask(columns[name])
        return columns, keep

    def _rows(self, layout: Layout, encoding: Encoding, dtype=torch.float32) -> torch.Tensor:
        """Every row as one encoded table (rows with a missing cell dropped, if asked)."""
        if not self.raw and not layout.text:
            return self._numbers(layout.used, dtype)
        columns, _ = self._raw_columns(layout.used, layout.missing)
        return self._encode(columns, encoding, layout, dtype)

    def _encode(self, columns: dict[str, Column], encoding: Encoding, layout: Layout, dtype=torch.float32):
        total = len(next(iter(columns.values())))
        where = lambda i: f"{self.name}, row {i + 1}"  # noqa: E731
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        table, keep, counts = encoding.encode(columns, layout.targets, layout.missing, where, layout.hint, np_dtype)
        if keep is not None:
            table = table[keep]
        if layout.missing == "drop":
            self.dropped = drop_message(counts, total - len(table), total)
        return torch.from_numpy(table)

    def _split(self, rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The in-memory held-out split: ``(train, held out)``; the same rows when none are held out."""
        train, held = split_rows(len(rows), self.val_fraction, seed)
        n_val = 0 if held is None else len(held)
        # Two rows at least on each side: R² is undefined on one.
        if len(rows) < MIN_ROWS or (self.val_fraction > 0 and not MIN_ROWS <= n_val <= len(rows) - MIN_ROWS):
            split = f" to hold out val_fraction={self.val_fraction}" if self.val_fraction else ""
            raise CropYieldError(
                f"{self.name}: {len(rows)} rows are too few{split} (need at least {MIN_ROWS} rows for "
                f"training and, when held out, {MIN_ROWS} for validation)"
            )
        return (rows, rows) if train is None else (rows[train], rows[held])

    def _numbers(self, wanted: Sequence[str], dtype=torch.float32) -> torch.Tensor:
        """Clean numeric rows through the fast readers (no text, no missing cell allowed)."""
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if self.files is not None and len(self.files) == 1:
            rows = torch.from_numpy(read_table(self.files[0], wanted, np_dtype))
        elif self.files is not None:  # a folder: its pieces, each copied once into one table
            pieces = list_pieces(self.files, wanted, self.limit_rows)
            table = np.empty((sum(p.rows for p in pieces), len(wanted)), dtype=np_dtype)
            start = 0
            for piece in pieces:
                table[start : start + piece.rows] = read_piece(piece, wanted, np_dtype)
                start += piece.rows
            rows = torch.from_numpy(table)
        else:
            columns, table = self.memory
            order = [columns.index(c) for c in wanted]
            # Columns already in order are a view: no second copy of the user's rows. float32 rows
            # stay float32 (the exact solver widens each batch); float64 ones are rounded for SGD only.
            rows = table[:, : len(order)] if order == list(range(len(order))) else table[:, order]
            if rows.dtype != torch.float32 and dtype == torch.float32:
                rows = rows.float()
        if self.limit_rows is not None:
            rows = rows[: self.limit_rows]
        return rows


def read_encoded(
    piece: Piece | str, layout: Layout, encoding: Encoding, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray | None]:
    """One file or piece, encoded: the table and the mask of rows kept (None: all)."""
    columns, where = read_cells(piece, layout.numeric, layout.text)
    table, keep, _ = encoding.encode(columns, layout.targets, layout.missing, where, layout.hint, dtype)
    return table, keep


def encoded_reader(layout: Layout, encoding: Encoding) -> Callable[[Piece, type], tuple[np.ndarray, np.ndarray | None]]:
    """The piece reader of a :class:`StreamSource` over raw files."""
    return lambda piece, dtype: read_encoded(piece, layout, encoding, dtype)


@dataclass
class Survey:
    """A first pass over pieces: the levels of the training rows, and rows kept per piece."""

    found: dict[str, set[str]]
    train_counts: list[int]
    val_counts: list[int]
    missing: dict[str, int] = field(default_factory=dict)  # missing cells per column, all rows
    dropped: int = 0
    rows: int = 0

    def merge(self, other: Survey) -> Survey:
        """Two surveys of disjoint pieces (counts of pieces the other did not read are zero)."""
        found = {c: self.found.get(c, set()) | other.found.get(c, set()) for c in {*self.found, *other.found}}
        missing = {c: self.missing.get(c, 0) + other.missing.get(c, 0) for c in {*self.missing, *other.missing}}
        return Survey(
            found,
            [a + b for a, b in zip(self.train_counts, other.train_counts, strict=True)],
            [a + b for a, b in zip(self.val_counts, other.val_counts, strict=True)],
            missing,
            self.dropped + other.dropped,
            self.rows + other.rows,
        )


def survey(
    pieces: Sequence[Piece],
    layout: Layout,
    val_fraction: float,
    seed: int,
    max_levels: int,
    mine: Sequence[int] | None = None,
    source: str = "the data",
) -> Survey:
    """Reads the pieces ``mine`` (default: all) once: the distinct values of the categorical
    columns in their training rows and, with ``missing="drop"``, the rows each piece keeps. Only
    the categorical columns are read, unless rows may be dropped (then every used column)."""
    drop = layout.missing == "drop"
    text = list(layout.text)
    numeric = layout.numeric if drop else []
    found: dict[str, set[str]] = {c: set() for c in text}
    missing: dict[str, int] = {}
    train_counts, val_counts = [0] * len(pieces), [0] * len(pieces)
    dropped = rows = 0
    mine = list(range(len(pieces))) if mine is None else list(mine)
    read = (lambda i: read_cells(pieces[i], numeric, text)[0]) if text or drop else (lambda i: {})
    for i, columns in zip(mine, read_ahead(mine, read), strict=True):
        piece = pieces[i]
        keep = np.ones(piece.rows, dtype=bool)
        for name in layout.used if drop else ():
            mask = missing_mask(columns[name])
            if mask.any():
                missing[name] = missing.get(name, 0) + int(mask.sum())
                keep &= ~mask
        held = held_out(piece, seed, val_fraction)
        train = keep & ~held
        for name in text:
            found[name] |= columns[name].present(np.flatnonzero(train))
            check_levels(name, len(found[name]), max_levels, source)
        train_counts[i] = int(train.sum())
        val_counts[i] = int((keep & held).sum()) if val_fraction > 0 else int(keep.sum())
        dropped += int((~keep).sum())
        rows += piece.rows
    return Survey(found, train_counts, val_counts, missing, dropped, rows)


def split_rows(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The in-memory held-out split: ``(train, eval)`` row indices, sorted; ``(None, None)`` for none."""
    n_val = round(count * val_fraction)
    if not n_val:
        return None, None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values
