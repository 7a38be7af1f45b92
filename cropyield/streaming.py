"""Streaming rows from files bigger than memory: pieces, the epoch plan, and read-ahead.

A data set is a list of pieces (Parquet row groups, blocks of CSV lines; see
:func:`cropyield.pieces.list_pieces`). Per epoch, seeded by ``(seed, epoch)``:

1. the pieces are shuffled and dealt to the processes, each to the one holding the fewest rows
   so far, so every process reads a disjoint part of the data;
2. each process reads its pieces in that order, a background thread reading ahead (one piece,
   two for the exact solver);
3. its rows are cut into windows of ``shuffle_buffer`` rows (a multiple of the batch size), and
   each window is permuted, with a generator seeded by ``(seed, epoch, rank, window)``, then
   served in batches.

What this guarantees: every training row is served at most once per epoch (exactly once on one
process), the order is reproducible for a seed, and a row only mixes with the rows of the pieces
in its window. Under DDP every process serves the same number of batches (Lightning's DDP steps
together): each takes the same quota of rows, ``(rows - (processes - 1) × largest piece) //
processes``, and what its pieces hold beyond that is left out for that epoch (different rows each
epoch, as the pieces are reshuffled). The exact solver reads every row exactly once: no quota; a
process with fewer rows ends with empty batches.

A held-out row (``val_fraction``) is chosen by a hash of its file and its position in the file,
so the split is the same every epoch, for every number of processes and every batch size.
"""

from __future__ import annotations

import ctypes
import math
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import reduce

import numpy as np
import torch

from cropyield.batches import EpochCounter, Resumable
from cropyield.errors import CropYieldError
from cropyield.pieces import Piece, read_piece, read_piece_blocks
from cropyield.reference import QRFactor

DEFAULT_SHUFFLE_BUFFER = 1 << 20
_BLOCK_ROWS = 1 << 16  # the fewest rows of a block of the exact pass (a whole number of batches)
_BLOCKS_AHEAD = 8  # blocks the exact pass reads ahead of the one in use: 21 MB of float32 at its batch
_END = object()


def read_ahead(items: Iterable, read: Callable | None = None, depth: int = 1) -> Iterator:
    """Yields ``read(item)`` for each item, read in a background thread at most ``depth`` items ahead
    (``read=None``: the items themselves, made by the thread as it iterates them: a generator).

    The thread takes (and reads) the next item only once there is room for it, so at most ``depth``
    results wait besides the one the consumer holds: memory stays a few pieces or blocks,
    whatever the data. pyarrow, numpy and torch release the GIL while they read, parse and copy, so
    the work overlaps training. An error in the thread is raised here, in order; closing the
    generator stops the thread, which closes ``items``.
    """
    results: queue.Queue = queue.Queue()
    room = threading.Semaphore(depth)
    stop = threading.Event()

    def work() -> None:
        iterator = iter(items)
        try:
            while True:
                while not room.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(iterator, _END)
                if item is _END:
                    break
                results.put((True, item if read is None else read(item)))
                del item
            results.put((True, _END))
        except BaseException as err:  # handed to the consumer, which raises it
            results.put((False, err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator's own cleanup (its files, its own read-ahead) runs now
                close()

    thread = threading.Thread(target=work, name="cropyield-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = results.get()
            if not ok:
                raise value
            if value is _END:
                return
            room.release()  # the thread may read the next item while this one is used
            yield value
            del value
    finally:
        stop.set()
        thread.join()


def _mix(*keys: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each in turn)."""
    h = 0x9E3779B97F4A7C15
    for key in keys:
        h = (h ^ (key & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def held_out(piece: Piece, seed: int, fraction: float) -> np.ndarray:
    """Which rows of a piece are held out for validation: a hash of (seed, file, row) below ``fraction``."""
    if fraction <= 0:
        return np.zeros(piece.rows, dtype=bool)
    position = np.arange(piece.first_row, piece.first_row + piece.rows, dtype=np.uint64)
    h = position ^ np.uint64(_mix(seed, piece.file_index))
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _fixed_mmap_threshold() -> None:
    """Has glibc's malloc hand every block of 1 MB or more straight back to the system when freed.

    By default glibc raises its mmap threshold to the size of the largest block freed so far, so
    once a piece is freed the next ones come from the heap, which keeps freed pieces resident:
    measured here, 1.6 times the memory that streaming really uses. A no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; fixing it disables the raising
    except (OSError, AttributeError):
        pass


class Blocks:
    """Column-major arrays of ``rows`` rows, each handed out again once nothing else refers to it.

    The exact pass reads its pieces into these: memory it has used before, where a new array for
    every piece had the kernel map and zero fresh pages (measured on this project's virtual machine:
    a third of the pass's CPU time, and the part that varied most from run to run). A block is free
    when only this pool refers to it: a batch cut from it, a view of one or a tensor made from
    either (Lightning's, a callback's) keeps it in use, so a block still held is never written.
    Taken from one thread (the reader); freed from any.
    """

    def __init__(self, rows: int, columns: int) -> None:
        self.rows, self.columns, self._arrays = rows, columns, []

    def take(self, rows: int, dtype) -> np.ndarray:
        """A free block's first ``rows`` rows (``rows <= self.rows``), in ``dtype``."""
        arrays = self._arrays
        for i in range(len(arrays)):
            # Its references: the list's and the call's own (any view or tensor of it adds one).
            if arrays[i].dtype == dtype and sys.getrefcount(arrays[i]) == 2:
                return arrays[i][:rows]
        arrays.append(np.empty((self.rows, self.columns), dtype=dtype, order="F"))
        return arrays[-1][:rows]

    def copied(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` copied into consecutive blocks (the last one shorter)."""
        out = []
        for start in range(0, len(rows), self.rows):
            part = rows[start : start + self.rows]
            out.append(self.take(len(part), part.dtype))
            out[-1][:] = part
        return out


class StreamSource:
    """The pieces of a data set and which of their rows train and which are held out.

    Args:
        pieces: the pieces, in order.
        columns: the columns of the rows served: read from the files as they are by default.
        val_fraction, seed: the held-out split.
        dtype: of the training rows (float64: the exact solver's reads); evaluation rows are float32.
        read: reads a piece, in a dtype, into its rows and the mask of those kept (None: all), when
            the files' columns are not the rows' (categorical columns encoded, rows with a missing
            cell dropped).
        counts: the rows each piece serves for training and for validation, when ``read`` drops some.
    """

    def __init__(
        self,
        pieces: Sequence[Piece],
        columns: Sequence[str],
        val_fraction: float,
        seed: int,
        dtype=torch.float32,
        *,
        read: Callable[[Piece, type], tuple[np.ndarray, np.ndarray | None]] | None = None,
        counts: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> None:
        _fixed_mmap_threshold()
        self.pieces, self.columns = list(pieces), list(columns)
        self.dtype = np.float64 if dtype == torch.float64 else np.float32  # float64: the exact solver's reads
        self.val_fraction, self.seed, self._read = val_fraction, seed, read
        if counts is not None:
            self.train_counts, self.val_counts = list(counts[0]), list(counts[1])
            return
        held = [int(held_out(p, seed, val_fraction).sum()) for p in self.pieces]
        self.train_counts = [p.rows - h for p, h in zip(self.pieces, held, strict=True)]
        self.val_counts = held if val_fraction > 0 else [p.rows for p in self.pieces]

    def read(self, index: int, part: str = "train") -> np.ndarray:
        """One piece's rows: ``train`` (not held out), ``val`` (held out; all rows when nothing is) or ``all``."""
        piece = self.pieces[index]
        dtype = self.dtype if part == "train" else np.float32
        # The exact solver's float64 rows by columns: its factor and HC pass copy them as columns.
        # Float32 Parquet columns stay float32 for it, as the in-memory rows do: it widens each
        # batch into its own float64 columns anyway (exactly), and the pass then reads and checks
        # half the bytes (measured 0.2 of its 1.0 s over 1e7 rows).
        wide = dtype == np.float64
        rows, keep = (
            (read_piece(piece, self.columns, dtype, "F" if wide else "C", keep_float32=wide), None)
            if self._read is None
            else self._read(piece, dtype)
        )
        if part == "all" or self.val_fraction <= 0:
            return rows if keep is None else rows[keep]
        mask = held_out(piece, self.seed, self.val_fraction)
        mask = mask if part == "val" else ~mask
        return rows[mask if keep is None else mask & keep]

    def read_blocks(self, index: int, blocks: Blocks) -> Iterator[np.ndarray]:
        """One piece's training rows, as :meth:`read` gives them, in blocks of ``blocks.rows`` rows
        from ``blocks``, yielded as each is filled: a Parquet piece decoded into them, other rows
        (encoded, split, CSV) copied."""
        if self._read is None and self.val_fraction <= 0:
            wide = self.dtype == np.float64
            return read_piece_blocks(self.pieces[index], self.columns, self.dtype, blocks, keep_float32=wide)
        return iter(blocks.copied(self.read(index)))

    def statistics(self, num_features: int, rank: int = 0, world_size: int = 1, progress=None) -> QRFactor:
        """The training rows' :class:`QRFactor` in one streaming pass; this process reads every
        ``world_size``-th piece and the factors are merged across processes, in rank order.
        ``progress(pieces)``, when given, makes a bar told of each piece's rows (``advance``)."""
        mine = [i for i in range(len(self.pieces)) if i % world_size == rank and self.train_counts[i]]
        local = QRFactor.empty(num_features, len(self.columns) - num_features)
        bar = progress(len(mine)) if progress is not None else None
        try:
            for rows in read_ahead(mine, self.read, depth=2):
                local = local.update(torch.from_numpy(rows))
                if bar is not None:
                    bar.advance(len(rows))
        finally:
            if bar is not None:
                bar.close()
        if world_size == 1:
            return local
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, local)
        return reduce(QRFactor.merge, gathered)


def deal(counts: Sequence[int], order: Iterable[int], world_size: int) -> list[list[int]]:
    """Deals pieces, in ``order``, each to the process holding the fewest rows so far."""
    loads, dealt = [0] * world_size, [[] for _ in range(world_size)]
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        dealt[rank].append(i)
        loads[rank] += counts[i]
    return dealt


class StreamedBatches(Resumable):
    """Training batches streamed from a :class:`StreamSource` (see the module's docstring).

    Args:
        source: the pieces and the split.
        num_features: the first columns are inputs, the rest targets.
        batch_size: rows per batch.
        shuffle: shuffle the pieces' order and the rows within each window.
        seed: seeds every epoch's plan, with the epoch.
        rank, world_size: this process and how many there are.
        exact_pass: serve every row exactly once (the exact solver), not an equal quota per process.
        shuffle_buffer: rows per shuffle window (rounded up to a multiple of ``batch_size``).
    """

    def __init__(
        self,
        source: StreamSource,
        num_features: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        exact_pass: bool = False,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        self.source, self.num_features, self.batch_size = source, num_features, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle and not exact_pass, seed, rank, world_size
        self.exact_pass = exact_pass
        self.window = max(1, math.ceil(shuffle_buffer / batch_size)) * batch_size
        self.sampler = EpochCounter()
        counts = source.train_counts
        if exact_pass:
            # Each piece is cut into batches of its own (no window, no copy): as many as the busiest process.
            self.quota = None
            shares = deal(counts, range(len(counts)), world_size)
            self.batches = max(1, *(sum(math.ceil(counts[i] / batch_size) for i in share) for share in shares))
        else:
            self.quota = (sum(counts) - (world_size - 1) * max(counts)) // world_size
            if self.quota < 1:
                raise CropYieldError(
                    f"{len(counts)} pieces (row groups or CSV blocks) are too few to share among {world_size} "
                    "processes; write the data in more, smaller row groups or files"
                )
            self.batches = math.ceil(self.quota / batch_size)

    def __len__(self) -> int:
        return self.batches

    def pieces(self, epoch: int) -> list[int]:
        """This process's pieces for an epoch, in reading order."""
        counts = self.source.train_counts
        if self.shuffle:
            order = torch.randperm(len(counts), generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
            order = order.tolist()
        else:
            order = range(len(counts))
        return deal(counts, order, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.exact_pass:
            yield from self._exact()
            return
        skip, epoch, size, f = self._start(), self.epoch, self.batch_size, self.num_features
        mine = self.pieces(epoch)
        counts = [self.source.train_counts[i] for i in mine]
        limit = self.quota  # the same for every process: DDP's steps stay in lockstep
        window = skip * size // self.window  # the window of the first batch to serve
        begin = window * self.window  # its first row in this process's stream
        ends = np.cumsum(counts)
        first = int(np.searchsorted(ends, begin, side="right"))
        needed = [mine[j] for j in range(first, len(mine)) if j == 0 or ends[j - 1] < limit]
        offset = begin - (int(ends[first - 1]) if first else 0)  # rows of the first piece before `begin`
        stream = read_ahead(needed, self.source.read)
        held: list[np.ndarray] = []
        try:
            while begin < limit:
                want = min(self.window, limit - begin)
                parts, have = [], 0
                while have < want:
                    rows = held.pop() if held else next(stream)[offset:]
                    offset = 0
                    take = rows[: want - have]
                    parts.append(take)
                    have += len(take)
                    if len(take) < len(rows):
                        held.append(rows[len(take) :])
                rows = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
                if self.shuffle:
                    generator = torch.Generator().manual_seed(_mix(self.seed, epoch, self.rank, window))
                    order = torch.randperm(len(rows), generator=generator)
                first_batch = skip - window * (self.window // size) if skip else 0
                skip = 0
                for start in range(first_batch * size, len(rows), size):
                    batch = rows[start : start + size]
                    if self.shuffle:
                        batch = rows.index_select(0, order[start : start + size])
                    self._yielded += 1
                    yield batch[:, :f], batch[:, f:]
                begin += want
                window += 1
        finally:
            stream.close()

    def _exact(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row of this process's pieces once, in order, each piece in batches of its own."""
        skip, size, f = self._start(), self.batch_size, self.num_features
        mine = self.pieces(self.epoch)
        per_piece = [math.ceil(self.source.train_counts[i] / size) for i in mine]
        first, passed = 0, 0
        while first < len(mine) and passed + per_piece[first] <= skip:  # pieces a resumed run has done
            passed += per_piece[first]
            first += 1
        drop = skip - passed  # batches of the first piece left that a resumed run has done
        # The pieces are read into blocks of whole batches that are reused: a batch is a view of its
        # block, and Lightning holds the current batch and the one fetched ahead, which keep only
        # their blocks in use (not their piece), so no copy is needed and memory stays a few blocks.
        blocks = Blocks(size * math.ceil(_BLOCK_ROWS / size), len(self.source.columns))
        read = (block for i in mine[first:] for block in self.source.read_blocks(i, blocks))
        stream = read_ahead(read, depth=_BLOCKS_AHEAD)
        try:
            for block in stream:
                for batch in torch.from_numpy(block).split(size):
                    if drop > 0:
                        drop -= 1
                        continue
                    self._yielded += 1
                    yield batch[:, :f], batch[:, f:]
        finally:
            stream.close()
        while self._yielded < self.batches:  # as many batches as the busiest process: empty ones
            self._yielded += 1
            empty = torch.empty(0, len(self.source.columns))
            yield empty[:, :f], empty[:, f:]


class StreamedRows:
    """Evaluation or prediction rows streamed in file order, this process's pieces only.

    Args:
        source: the pieces and the split.
        num_features: the first columns are inputs; later ones (when ``with_targets``) targets.
        batch_size: rows per batch.
        part: ``val`` (the held-out rows, or all rows when nothing is held out) or ``all``.
        rank, world_size: this process takes every ``world_size``-th piece.
    """

    def __init__(
        self,
        source: StreamSource,
        num_features: int,
        batch_size: int,
        part: str = "val",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source, self.num_features, self.batch_size, self.part = source, num_features, batch_size, part
        counts = source.val_counts if part == "val" else [p.rows for p in source.pieces]
        self.mine = [i for i in range(len(counts)) if i % world_size == rank and counts[i]]
        self.batches = sum(math.ceil(counts[i] / batch_size) for i in self.mine)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        f = self.num_features
        with_targets = len(self.source.columns) > f
        for rows in read_ahead(self.mine, lambda i: self.source.read(i, self.part)):
            batches = list(torch.from_numpy(rows).split(self.batch_size))
            del rows
            while batches:
                batch = batches.pop(0).clone()  # the batches Lightning holds keep no whole piece alive
                yield (batch[:, :f], batch[:, f:]) if with_targets else batch
