"""Where a stage's rows come from: one small interface over an in-memory table and streamed pieces.

The data module builds one :class:`RowSource` per stage and calls it once per hook: its training
loader, its evaluation loader and its statistics. The two sources:

- :class:`TableSource`: rows in memory as one ``[rows, features + targets]`` tensor: the tutorial's
  ``DataLoader(TensorDataset(...), shuffle=True)`` for small data, one permutation per epoch and
  gathered batches from ``fast_path_min_rows`` rows on, in-order slices for the exact solver and
  evaluation;
- :class:`StreamedSource`: pieces read from the files as they are needed (:mod:`cropyield.streaming`).

The rows reach a source already encoded (:mod:`cropyield.encoding`): categorical columns as 0/1
columns, rows with a missing cell dropped when asked; :class:`cropyield.reader.RowReader` reads
them and builds the sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from cropyield.batches import EpochPermutation, GatheredBatches, SlicedBatches
from cropyield.reference import QRFactor
from cropyield.streaming import StreamedBatches, StreamedRows, StreamSource


@dataclass(frozen=True)
class LoaderOptions:
    """The data module's settings that shape the training batches."""

    batch_size: int
    shuffle: bool
    seed: int
    fast_path_min_rows: int
    shuffle_buffer: int


class RowSource:
    """The rows of one stage: training batches, evaluation batches and their statistics."""

    num_features: int

    def train_loader(self, options: LoaderOptions, rank: int, world: int, exact: bool, device=None):
        """The training iterable: every row once in order for the exact solver, else shuffled batches."""
        raise NotImplementedError

    def eval_loader(self, batch_size: int, rank: int, world: int):
        """Validation, test or prediction batches, in order; this process's share under DDP."""
        raise NotImplementedError

    def statistics(self, rank: int, world: int, progress=None) -> QRFactor:
        """The float64 :class:`~cropyield.reference.QRFactor` of the training rows (``progress``:
        a bar for a pass over files, see :meth:`~cropyield.streaming.StreamSource.statistics`)."""
        raise NotImplementedError

    statistics_cost_a_pass = False  # whether :meth:`statistics` reads the files again


class TableSource(RowSource):
    """Rows in memory: ``train`` and ``evaluate`` tables ``[rows, features (+ targets)]``."""

    def __init__(self, train: torch.Tensor, evaluate: torch.Tensor, num_features: int, fast_path_min_rows: int):
        self.train, self.evaluate, self.num_features = train, evaluate, num_features
        self.fast_path_min_rows = fast_path_min_rows

    @property
    def uses_fast_path(self) -> bool:
        return len(self.train) >= self.fast_path_min_rows

    def train_loader(self, options: LoaderOptions, rank: int, world: int, exact: bool, device=None):
        if exact:  # the exact solver reads every training row once, each process a disjoint share
            return SlicedBatches(self.train, self.num_features, options.batch_size, rank, world)
        if self.uses_fast_path:
            if device is not None and self.train.device != device:
                self.train = self.train.to(device)  # once: batches are then gathered on the device
            sampler = EpochPermutation(len(self.train), options.batch_size, options.shuffle, options.seed, rank, world)
            return GatheredBatches(self.train, self.num_features, sampler)
        f = self.num_features
        # The tutorial's loader, bit for bit: it shuffles with the global RNG.
        dataset = TensorDataset(self.train[:, :f].contiguous(), self.train[:, f:].contiguous())
        return DataLoader(dataset, batch_size=options.batch_size, shuffle=options.shuffle)

    def eval_loader(self, batch_size: int, rank: int, world: int):
        rows, f = self.evaluate, self.num_features
        if len(rows) >= self.fast_path_min_rows:
            return SlicedBatches(rows, f, batch_size, rank, world)
        tensors = [rows[:, :f].contiguous()]
        if rows.shape[1] > f:
            tensors.append(rows[:, f:].contiguous())
        # Its own generator: an iterator of a loader without one draws a seed from the global RNG,
        # which would shift the next training shuffle away from the tutorial's.
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False, generator=torch.Generator())

    def statistics(self, rank: int, world: int, progress=None) -> QRFactor:
        return QRFactor.of_table(self.train, self.num_features)


class StreamedSource(RowSource):
    """Rows streamed from a :class:`~cropyield.streaming.StreamSource`'s pieces."""

    statistics_cost_a_pass = True

    def __init__(self, stream: StreamSource, num_features: int, part: str = "val") -> None:
        self.stream, self.num_features, self.part = stream, num_features, part

    def train_loader(self, options: LoaderOptions, rank: int, world: int, exact: bool, device=None):
        return StreamedBatches(
            self.stream, self.num_features, options.batch_size, options.shuffle, options.seed, rank, world,
            exact_pass=exact, shuffle_buffer=options.shuffle_buffer,
        )  # fmt: skip

    def eval_loader(self, batch_size: int, rank: int, world: int):
        return StreamedRows(self.stream, self.num_features, batch_size, self.part, rank, world)

    def statistics(self, rank: int, world: int, progress=None) -> QRFactor:
        return self.stream.statistics(self.num_features, rank, world, progress)
