"""The in-memory batch iterables: one permutation per epoch, batches gathered from one tensor.

Training iterables are resumable: Lightning saves their ``state_dict`` in every checkpoint and
restores it with ``--ckpt_path`` (it does so for any training iterable that has the two methods),
so a run resumed from a mid-epoch checkpoint serves exactly the batches the interrupted run had
not trained on: no row repeated, none skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch


class EpochCounter:
    """The epoch a sampler is in. Lightning calls ``set_epoch`` on a loader's ``sampler`` at the
    start of each epoch, as it does for a ``DistributedSampler``.

    After a restored state, the data's epoch is the state's, whatever the Trainer counts: Lightning
    counts an epoch that ``max_steps`` stopped as done, so a run resumed from there is one epoch
    ahead of its data. The difference is kept, so the resumed run's batches are the uninterrupted
    run's.
    """

    epoch = 0
    _restored: int | None = None  # the epoch of a restored state, until the Trainer's next set_epoch
    _offset = 0

    def set_epoch(self, epoch: int) -> None:
        if self._restored is not None:
            self._offset, self._restored = self._restored - epoch, None
        self.epoch = epoch + self._offset

    def restore(self, epoch: int) -> None:
        self.epoch = self._restored = epoch


class Resumable:
    """Epoch and position bookkeeping of a training iterable whose ``sampler`` is an :class:`EpochCounter`.

    ``progress`` (set by the data module) counts the batches the Trainer has taken: Lightning
    fetches a batch ahead, so counting what was yielded would overstate what was trained on by one.
    """

    sampler: EpochCounter
    progress: Callable[[], int] | None = None
    _skip = 0  # batches of a restored epoch already trained on, passed over once
    _start_batch = _start_progress = _yielded = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        if self.progress is None:
            return {"epoch": self.epoch, "batches": self._yielded}
        return {"epoch": self.epoch, "batches": self._start_batch + self.progress() - self._start_progress}

    def load_state_dict(self, state: dict) -> None:
        epoch, skip = int(state["epoch"]), int(state["batches"])
        if skip >= len(self):  # saved at the epoch's end: the next one starts afresh
            epoch, skip = epoch + 1, 0
        self.sampler.restore(epoch)
        self._skip = skip

    def _start(self) -> int:
        """The batches to skip in the iteration that starts now (consumed once)."""
        skip, self._skip = self._skip, 0
        self._start_batch = self._yielded = skip
        self._start_progress = self.progress() if self.progress is not None else 0
        return skip

    def __len__(self) -> int:
        raise NotImplementedError


class EpochPermutation(EpochCounter):
    """Batches of row indices: one permutation per epoch, seeded by ``(seed, epoch)``.

    Under DDP every rank draws the same permutation and takes its own contiguous shard of equal
    size (the remainder, fewer rows than processes, is dropped for that epoch).
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_rows, self.batch_size, self.shuffle = num_rows, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard = num_rows // world_size

    def __len__(self) -> int:
        return math.ceil(self.shard / self.batch_size)

    def indices(self, epoch: int, device: torch.device) -> torch.Tensor:
        """This rank's rows for an epoch, in training order."""
        if self.shuffle:
            generator = torch.Generator(device=device).manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=generator, device=device)
        else:
            order = torch.arange(self.num_rows, device=device)
        return order[self.rank * self.shard : (self.rank + 1) * self.shard]


class GatheredBatches(Resumable):
    """An iterable of ``(inputs, targets)`` batches, each gathered by one ``index_select``."""

    def __init__(self, rows: torch.Tensor, num_features: int, sampler: EpochPermutation):
        self.rows, self.num_features, self.sampler = rows, num_features, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        f, size = self.num_features, self.sampler.batch_size
        skip = self._start()
        indices = self.sampler.indices(self.epoch, self.rows.device)
        for idx in indices[skip * size :].split(size):
            batch = self.rows.index_select(0, idx)
            self._yielded += 1
            yield batch[:, :f], batch[:, f:]


class SlicedBatches:
    """Contiguous slices of the rows, in order; this rank's share of them under DDP.

    Every row is served once across the ranks, and every rank yields the same number of batches
    (Lightning runs a collective every training step under DDP, so unequal counts would hang):
    a rank whose share is one row short makes its batches that much smaller.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        num_features: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(rows)
        self.rows = rows[rank * n // world_size : (rank + 1) * n // world_size]  # shares differ by a row at most
        self.num_features = num_features
        self.batches = max(1, math.ceil(math.ceil(n / world_size) / batch_size))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        f = self.num_features
        for batch in self.rows.tensor_split(self.batches):
            yield (batch[:, :f], batch[:, f:]) if batch.shape[1] > f else batch[:, :f]


class Chunk(list):
    """Several consecutive training batches, given to one ``training_step`` that steps on each."""


class Chunks:
    """Groups a training iterable's batches ``steps`` at a time, so that one ``training_step`` call
    runs several optimizer steps and Lightning's per-call cost is paid once per chunk.

    The batches, their order and the state are the wrapped loader's: the state is kept in batches,
    so a run resumed mid-epoch serves the same batches whatever the chunk size. ``progress`` is the
    wrapped loader's too; the data module sets it to the optimizer steps taken (one per batch), so
    a chunk cut short by ``max_steps`` counts only the batches trained on.
    """

    def __init__(self, loader: Resumable, steps: int) -> None:
        self.loader, self.steps = loader, steps
        self.sampler = loader.sampler  # Lightning calls set_epoch on it

    @property
    def progress(self) -> Callable[[], int] | None:
        return self.loader.progress

    @progress.setter
    def progress(self, progress: Callable[[], int] | None) -> None:
        self.loader.progress = progress

    def __len__(self) -> int:
        return math.ceil(len(self.loader) / self.steps)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[Chunk]:
        chunk = Chunk()
        for batch in self.loader:
            chunk.append(batch)
            if len(chunk) == self.steps:
                yield chunk
                chunk = Chunk()
        if chunk:
            yield chunk
