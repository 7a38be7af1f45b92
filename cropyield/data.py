"""The tutorial's data, and the LightningDataModule that serves it or a user's CSV/Parquet files.

Which path serves the rows:

- small in-memory data: exactly the tutorial's ``DataLoader(TensorDataset(...), 5, shuffle=True)``;
- from ``fast_path_min_rows`` rows on: one permutation per epoch and one gather per batch from a
  single ``[rows, features + targets]`` tensor (:mod:`cropyield.batches`); evaluation reads slices;
- ``streaming=True``: rows read piece by piece from the files, never all at once
  (:mod:`cropyield.streaming`);
- the exact solver (a model with ``exact_pass``): every training row once, in order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from cropyield.batches import Chunks, EpochPermutation, GatheredBatches, SlicedBatches
from cropyield.errors import CropYieldError
from cropyield.files import check_columns, check_files, data_files, list_pieces, read_columns, read_piece, read_table
from cropyield.reference import QRFactor
from cropyield.streaming import DEFAULT_SHUFFLE_BUFFER, StreamedBatches, StreamedRows, StreamSource

# Input (temp, rainfall, humidity) and targets (apples, oranges), as in the tutorial's
# built-ins section. The first 5 rows are the from-scratch section's data.
INPUTS = torch.tensor(
    [[73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70],
     [74, 66, 43], [91, 87, 65], [88, 134, 59], [101, 44, 37], [68, 96, 71],
     [73, 66, 44], [92, 87, 64], [87, 135, 57], [103, 43, 36], [68, 97, 70]],
    dtype=torch.float32,
)  # fmt: skip
TARGETS = torch.tensor(
    [[56, 70], [81, 101], [119, 133], [22, 37], [103, 119],
     [57, 69], [80, 102], [118, 132], [21, 38], [104, 118],
     [57, 69], [82, 100], [118, 134], [20, 38], [102, 120]],
    dtype=torch.float32,
)  # fmt: skip
FEATURE_NAMES = ("temp", "rainfall", "humidity")
TARGET_NAMES = ("apples", "oranges")

TUTORIAL_UNITS = "tons per hectare"  # the tutorial's unit of yield; other data's is not known

FAST_PATH_MIN_ROWS = 50_000
MIN_ROWS = 2


class CropYieldDataModule(L.LightningDataModule):
    """Crop-yield rows for training, validation, testing and prediction.

    With no arguments: the tutorial's 15 embedded rows, shuffled batches of 5 for training, and the
    same rows in order for validation, testing and prediction (the tutorial evaluates on its
    training data).

    Args:
        data_path: a CSV or Parquet file to read instead of the embedded data (chosen by extension),
            or a folder: its ``.csv`` and ``.parquet`` files, in sorted name order, with one schema.
        csv_path: alias of ``data_path``; give one of the two.
        feature_names: input columns, in order. Default: the tutorial's for the embedded data;
            for a file, every column that is not a target.
        target_names: target columns, in order. Default: ``apples, oranges``.
        batch_size: rows per batch, per process under DDP.
        shuffle: reshuffle the training rows every epoch.
        val_fraction: hold out this fraction of the rows, chosen with ``seed``, for validation
            and testing. 0 evaluates on the training rows, as the tutorial does. In memory, exactly
            that fraction is drawn; streaming, each row is held out by a hash of its file and position.
        limit_rows: use only the first N rows (5 gives the tutorial's from-scratch data).
        standardize: compute per-feature mean and std on the training rows; a model created with
            ``standardize=True`` stores them and standardizes its inputs.
        seed: seed of the held-out split and of the fast path's shuffling. None takes the global
            seed (the one ``seed_everything`` set) when the data is set up.
        fast_path_min_rows: from this many training rows on, batches are gathered from one tensor
            with one permutation per epoch; below it, the tutorial's ``DataLoader`` is used.
        streaming: read ``data_path`` piece by piece (Parquet row groups, CSV blocks) in a
            background thread instead of into memory: memory is bounded by ``shuffle_buffer``
            and the pieces in flight, not by the data. Shuffling is then per window (see
            ``cropyield.streaming``); statistics take one extra pass.
        shuffle_buffer: when streaming, rows shuffled together (rounded up to whole batches).
        steps_per_call: on the fast and streaming paths, batches given to one ``training_step``,
            which takes one optimizer step on each (Lightning's per-call cost is then paid once for
            them all; the arithmetic is that of one batch per call). None chooses it (about 2^19
            rows a call, at most 64 batches, a divisor of ``every_n_train_steps``); 1 turns it off.
            Only cropyield's own ``training_step`` does this: a subclass that overrides it gets
            one batch per call.
    """

    _memory: tuple[tuple[str, ...], torch.Tensor] | None = None  # (column names, rows), from_tensors

    def __init__(
        self,
        data_path: str | None = None,
        csv_path: str | None = None,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        batch_size: int = 5,
        shuffle: bool = True,
        val_fraction: float = 0.0,
        limit_rows: int | None = None,
        standardize: bool = False,
        seed: int | None = None,
        fast_path_min_rows: int = FAST_PATH_MIN_ROWS,
        streaming: bool = False,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        steps_per_call: int | None = None,
    ) -> None:
        super().__init__()
        if data_path is not None and csv_path is not None:
            raise CropYieldError("give either data_path or csv_path (its alias), not both")
        if batch_size < 1:
            raise CropYieldError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise CropYieldError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if limit_rows is not None and limit_rows < 1:
            raise CropYieldError(f"limit_rows must be at least 1, got {limit_rows}")
        if steps_per_call is not None and steps_per_call < 1:
            raise CropYieldError(f"steps_per_call must be at least 1, got {steps_per_call}")
        if shuffle_buffer < 1:
            raise CropYieldError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        path = data_path if data_path is not None else csv_path
        if streaming and path is None:
            raise CropYieldError("streaming=True reads files: give data_path (a file or a folder)")
        self.data_path = os.fspath(path) if path is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.val_fraction = val_fraction
        self.limit_rows = limit_rows
        self.standardize = standardize
        self.seed = seed
        self.fast_path_min_rows = fast_path_min_rows
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.steps_per_call = steps_per_call

        if self.data_path is not None:
            # The headers are read now, so a bad path or column fails before a Trainer exists.
            self._files = data_files(self.data_path)
            source, columns = str(self._files[0]), read_columns(self._files[0])
        elif self._memory is not None:
            source, columns = "the given tensors", self._memory[0]
        else:
            source, columns = "the embedded data", (*FEATURE_NAMES, *TARGET_NAMES)
        self.target_names = tuple(target_names) if target_names is not None else TARGET_NAMES
        check_columns(source, self.target_names, columns)
        inferred = feature_names is None
        if feature_names is None:
            feature_names = [c for c in columns if c not in self.target_names]
        self.feature_names = tuple(feature_names)
        check_columns(source, self.feature_names, columns)
        overlap = sorted(set(self.feature_names) & set(self.target_names))
        if overlap:
            raise CropYieldError(f"column(s) {overlap} cannot be both a feature and a target")
        if not self.feature_names or not self.target_names:
            raise CropYieldError(f"{source}: need at least one feature column and one target column")
        if self.data_path is not None:  # a folder's files: columns by name, in any order
            check_files(self._files, [*self.feature_names, *self.target_names], columns if inferred else None)
        self._columns = tuple(columns)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self._train: torch.Tensor | None = None  # [rows, features + targets]
        self._eval: torch.Tensor | None = None  # validation/test rows, same layout
        self._predict: torch.Tensor | None = None  # [rows, features (+ targets when present)]
        self._statistics: QRFactor | None = None
        self._stream: StreamSource | None = None  # streaming: the pieces and the split
        self._predict_stream: StreamSource | None = None

    @classmethod
    def from_tensors(
        cls,
        inputs: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray,
        batch_size: int = 5,
        shuffle: bool = True,
        **kwargs,
    ) -> CropYieldDataModule:
        """Builds a data module over in-memory rows (tensors or numpy arrays, made float32; float64
        ones are kept as they are for the exact solver, which reads them unrounded).

        Columns are named as the tutorial's when the shapes are its (3 features, 2 targets), else
        ``feature_0, ...`` and ``target_0, ...``. Other keyword arguments are the constructor's.
        """
        inputs, targets = torch.as_tensor(inputs), torch.as_tensor(targets)
        dtype = torch.float64 if inputs.dtype == targets.dtype == torch.float64 else torch.float32
        inputs, targets = inputs.to(dtype), targets.to(dtype)
        if inputs.ndim != 2 or targets.ndim != 2 or len(inputs) != len(targets):
            raise CropYieldError(
                "inputs and targets must be 2-D with one row per observation, got shapes "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        if not (torch.isfinite(inputs).all() and torch.isfinite(targets).all()):
            raise CropYieldError("inputs and targets must be finite (found NaN or infinity)")
        features = default_names(inputs.shape[1], FEATURE_NAMES, "feature")
        targets_ = default_names(targets.shape[1], TARGET_NAMES, "target")
        dm = cls.__new__(cls)
        dm._memory = ((*features, *targets_), torch.cat([inputs, targets], dim=1))
        kwargs.setdefault("target_names", targets_)
        dm.__init__(batch_size=batch_size, shuffle=shuffle, **kwargs)
        return dm

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    @property
    def units(self) -> str | None:
        """The targets' unit, where known: the tutorial's for its embedded rows, else None."""
        return TUTORIAL_UNITS if self.data_path is None and self._memory is None else None

    @property
    def uses_fast_path(self) -> bool:
        return self._train is not None and len(self._train) >= self.fast_path_min_rows

    def setup(self, stage: str) -> None:
        if self.streaming:
            self._setup_streaming(stage)
            return
        if stage == "predict":
            if self._predict is None:
                self._predict = self._load(targets_required=False)
            return
        if self._train is not None:
            return
        rows = self._load(targets_required=True)
        n_val = round(len(rows) * self.val_fraction)
        # Two rows at least on each side: R² is undefined on one.
        if len(rows) < MIN_ROWS or (self.val_fraction > 0 and not MIN_ROWS <= n_val <= len(rows) - MIN_ROWS):
            split = f" to hold out val_fraction={self.val_fraction}" if self.val_fraction else ""
            raise CropYieldError(
                f"{self._source_name()}: {len(rows)} rows are too few{split} (need at least {MIN_ROWS} rows for "
                f"training and, when held out, {MIN_ROWS} for validation)"
            )
        if n_val:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self._seed()))
            self._eval = rows[order[:n_val].sort().values]
            self._train = rows[order[n_val:].sort().values]
        else:
            self._train = self._eval = rows
        if self.standardize:
            mean, std = self.statistics().feature_scale()
            self.feature_mean, self.feature_std = mean.float(), std.float()

    def _setup_streaming(self, stage: str) -> None:
        if stage == "predict":
            if self._predict_stream is None:
                wanted = self._wanted(targets_required=False)
                pieces = list_pieces(self._files, wanted, self.limit_rows)
                self._predict_stream = StreamSource(pieces, wanted, 0.0, self._seed())
            return
        if self._stream is not None:
            return
        wanted = self._wanted(targets_required=True)
        pieces = list_pieces(self._files, wanted, self.limit_rows)
        self._stream = StreamSource(pieces, wanted, self.val_fraction, self._seed(), self._dtype())
        train, held = sum(self._stream.train_counts), sum(p.rows for p in pieces) - sum(self._stream.train_counts)
        if train < MIN_ROWS or (self.val_fraction > 0 and held < MIN_ROWS):
            raise CropYieldError(
                f"{self.data_path}: {train} training and {held} held-out rows are too few (need at least "
                f"{MIN_ROWS} of each)"
            )
        if self.standardize and self.feature_mean is None:
            mean, std = self.statistics().feature_scale()
            self.feature_mean, self.feature_std = mean.float(), std.float()

    def statistics(self) -> QRFactor:
        """The float64 QR factor of the training rows ``[features | 1 | targets]``, computed once:
        the least-squares optimum, ``standardize`` and the stable-step check all use it.
        Streaming, they take one pass over the files (each process reads its share under DDP)."""
        if self._statistics is None:
            if self._stream is not None:
                rank, world = self._rank_and_world()
                self._statistics = self._stream.statistics(self.num_features, rank, world)
            elif self._train is not None:
                self._statistics = QRFactor.of_table(self._train, self.num_features)
            else:
                raise RuntimeError("call setup('fit') first")
        return self._statistics

    @property
    def statistics_in_hand(self) -> bool:
        """Whether :meth:`statistics` costs no pass over files: computed already, or rows in memory."""
        return self._statistics is not None or self._stream is None

    def training_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training inputs and targets (views into one table); call after ``setup("fit")``.
        Not available when streaming: the rows are never all in memory."""
        if self._train is None:
            raise RuntimeError("call setup('fit') first" + ("; not available when streaming" * self.streaming))
        return self._train[:, : self.num_features], self._train[:, self.num_features :]

    def train_dataloader(self):
        exact = getattr(self.trainer and self.trainer.lightning_module, "exact_pass", False)
        if self._stream is not None:
            rank, world = self._rank_and_world()
            loader = StreamedBatches(
                self._stream, self.num_features, self.batch_size, self.shuffle, self._seed(), rank, world,
                exact_pass=exact, shuffle_buffer=self.shuffle_buffer,
            )  # fmt: skip
            return self._chunked(loader)
        if exact:
            # The exact solver reads every training row once, each process a disjoint share.
            rank, world = self._rank_and_world()
            return SlicedBatches(self._train, self.num_features, self.batch_size, rank, world)
        if self.uses_fast_path:
            rank, world = self._rank_and_world()
            device = self.trainer.strategy.root_device if self.trainer is not None else None
            if device is not None and self._train.device != device:
                self._train = self._train.to(device)  # once: batches are then gathered on the device
            sampler = EpochPermutation(
                len(self._train),
                self.batch_size,
                self.shuffle,
                self._seed(),
                rank,
                world,
            )
            return self._chunked(GatheredBatches(self._train, self.num_features, sampler))
        inputs, targets = self.training_rows()
        return DataLoader(
            TensorDataset(inputs.contiguous(), targets.contiguous()),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
        )

    def val_dataloader(self):
        return self._ordered(self._eval, self.num_features, self._stream)

    def test_dataloader(self):
        return self._ordered(self._eval, self.num_features, self._stream)

    def predict_dataloader(self):
        return self._ordered(self._predict, self.num_features, self._predict_stream, part="all")

    def state_dict(self) -> dict:
        # The tutorial's loader shuffles with the global RNG: saving its state lets a resumed run
        # draw the same permutations as an uninterrupted one. The fast path seeds every epoch.
        return {"torch_rng_state": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "torch_rng_state" in state_dict:
            torch.set_rng_state(state_dict["torch_rng_state"])

    def _chunked(self, loader):
        """Groups the batches in chunks when the model steps on chunks (see ``steps_per_call``), and
        lets the loader's state_dict count what the Trainer has taken, not what it fetched ahead."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        steps = 1
        if model is not None and getattr(type(model).training_step, "handles_chunks", False):
            steps = self.steps_per_call or min(64, max(1, (1 << 19) // self.batch_size))
            for callback in self.trainer.checkpoint_callbacks:  # step checkpoints fall on chunk ends
                every = getattr(callback, "_every_n_train_steps", 0)
                steps = math.gcd(steps, every) if every else steps
            steps = min(steps, len(loader))
        if steps > 1:
            loader = Chunks(loader, steps)
            loader.progress = lambda: self.trainer.global_step  # one optimizer step per batch
        elif self.trainer is not None:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            loader.progress = lambda: progress.ready
        return loader

    def _ordered(self, rows: torch.Tensor | None, num_features: int, stream: StreamSource | None, part: str = "val"):
        if stream is not None:
            rank, world = self._rank_and_world()
            return StreamedRows(stream, num_features, self.batch_size, part, rank, world)
        if rows is None:
            raise RuntimeError("call setup() first")
        if len(rows) >= self.fast_path_min_rows:
            rank, world = self._rank_and_world()
            return SlicedBatches(rows, num_features, self.batch_size, rank, world)
        tensors = [rows[:, :num_features].contiguous()]
        if rows.shape[1] > num_features:
            tensors.append(rows[:, num_features:].contiguous())
        # Its own generator: an iterator of a loader without one draws a seed from the global RNG,
        # which would shift the next training shuffle away from the tutorial's.
        return DataLoader(
            TensorDataset(*tensors), batch_size=self.batch_size, shuffle=False, generator=torch.Generator()
        )

    def _source_name(self) -> str:
        return self.data_path or ("the given tensors" if self._memory else "the embedded data")

    def _wanted(self, targets_required: bool) -> list[str]:
        wanted = list(self.feature_names)
        if targets_required or all(t in self._columns for t in self.target_names):
            wanted += self.target_names
        return wanted

    def _dtype(self) -> torch.dtype:
        """float64 for a model that asks for it (the exact solver: every digit of the files), else float32."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(model, "data_dtype", torch.float32)

    def _load(self, targets_required: bool) -> torch.Tensor:
        wanted = self._wanted(targets_required)
        dtype = self._dtype() if targets_required else torch.float32
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if self.data_path is not None and len(self._files) == 1:
            rows = torch.from_numpy(read_table(self._files[0], wanted, np_dtype))
        elif self.data_path is not None:  # a folder: its pieces, each copied once into one table
            pieces = list_pieces(self._files, wanted, self.limit_rows)
            table = np.empty((sum(p.rows for p in pieces), len(wanted)), dtype=np_dtype)
            start = 0
            for piece in pieces:
                table[start : start + piece.rows] = read_piece(piece, wanted, np_dtype)
                start += piece.rows
            rows = torch.from_numpy(table)
        else:
            columns, table = self._memory or (
                (*FEATURE_NAMES, *TARGET_NAMES),
                torch.cat([INPUTS, TARGETS], 1),
            )
            order = [columns.index(c) for c in wanted]
            # Columns already in order are a view: no second copy of the user's rows. float32 rows
            # stay float32 (the exact solver widens each batch); float64 ones are rounded for SGD only.
            rows = table[:, : len(order)] if order == list(range(len(order))) else table[:, order]
            if rows.dtype != torch.float32 and dtype == torch.float32:
                rows = rows.float()
        if self.limit_rows is not None:
            rows = rows[: self.limit_rows]
        return rows

    def _seed(self) -> int:
        return self.seed if self.seed is not None else torch.initial_seed() % 2**63

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size


def default_names(count: int, tutorial: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """The tutorial's column names when there are as many, else ``prefix_0, prefix_1, ...``."""
    return tutorial if count == len(tutorial) else tuple(f"{prefix}_{i}" for i in range(count))
