"""The tutorial's data, and the LightningDataModule that serves it or a user's CSV/Parquet files.

Which path serves the rows:

- small in-memory data: exactly the tutorial's ``DataLoader(TensorDataset(...), 5, shuffle=True)``;
- from ``fast_path_min_rows`` rows on: one permutation per epoch and one gather per batch from a
  single ``[rows, features + targets]`` tensor (:mod:`cropyield.batches`); evaluation reads slices;
- ``streaming=True``: rows read piece by piece from the files, never all at once
  (:mod:`cropyield.streaming`);
- the exact solver (a model with ``exact_pass``): every training row once, in order.

The first two are a :class:`~cropyield.sources.TableSource`, streaming a
:class:`~cropyield.sources.StreamedSource`: the module has :class:`~cropyield.reader.RowReader`
build one per stage and calls it once per hook. Categorical columns are encoded and rows with a
missing cell dropped before the rows reach a source (:mod:`cropyield.encoding`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch

from cropyield.batches import Chunks, Resumable
from cropyield.cells import text_columns
from cropyield.encoding import DEFAULT_MAX_LEVELS, MISSING_CHOICES, Encoding
from cropyield.errors import CropYieldError
from cropyield.files import check_columns, check_files, data_files, read_columns
from cropyield.reader import Layout, RowReader
from cropyield.reference import QRFactor
from cropyield.sources import LoaderOptions, RowSource, TableSource
from cropyield.streaming import DEFAULT_SHUFFLE_BUFFER

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
            ``standardize=True`` stores them and standardizes its inputs (numeric columns only:
            the 0/1 columns of categorical ones stay as they are).
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
        categorical_names: input columns encoded as categories (treatment coding: levels sorted,
            the first the reference, one 0/1 column ``Item[T.Potatoes]`` per other level). Default:
            every input column whose values are text; a numeric column such as ``Year`` may be named.
            The levels are learned from the training rows in one pass that reads only these columns.
        max_levels: the most distinct values a categorical column may hold (more is an error: an
            identifier column is not a category).
        missing: ``error`` (a missing cell stops with its file, row and column) or ``drop`` (rows
            with an empty, NaN or null cell in a used column are left out of training, validation
            and the statistics; one line says how many, per column).
        levels: the levels of categorical columns, as ``{"Item": ["Maize", "Potatoes"]}``, the first
            the reference, instead of learning them (a model rebuilt from a checkpoint uses its own).
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
        categorical_names: Sequence[str] | None = None,
        max_levels: int = DEFAULT_MAX_LEVELS,
        missing: str = "error",
        levels: dict[str, list[str]] | None = None,
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
        if missing not in MISSING_CHOICES:
            raise CropYieldError(f"missing must be one of {list(MISSING_CHOICES)}, got {missing!r}")
        if max_levels < 1:
            raise CropYieldError(f"max_levels must be at least 1, got {max_levels}")
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
        self.max_levels = max_levels
        self.missing = missing

        if self.data_path is not None:
            # The headers are read now, so a bad path or column fails before a Trainer exists.
            self._files = data_files(self.data_path)
            source, columns = str(self._files[0]), read_columns(self._files[0])
        elif self._memory is not None:
            source, columns = "the given tensors", self._memory[0]
        else:
            source, columns = "the embedded data", (*FEATURE_NAMES, *TARGET_NAMES)
        self.target_names = tuple(target_names) if target_names is not None else TARGET_NAMES
        # Prediction needs no targets: a file with none of them is refused by the other stages' setup.
        self._no_targets: CropYieldError | None = None
        try:
            check_columns(source, self.target_names, columns)
        except CropYieldError as err:
            if any(t in columns for t in self.target_names):
                raise
            self._no_targets = err
        inferred = feature_names is None
        if feature_names is None:
            feature_names = [c for c in columns if c not in self.target_names]
        self.input_names = tuple(feature_names)  # the raw input columns; feature_names are the encoded ones
        check_columns(source, self.input_names, columns)
        overlap = sorted(set(self.input_names) & set(self.target_names))
        if overlap:
            raise CropYieldError(f"column(s) {overlap} cannot be both a feature and a target")
        if not self.input_names or not self.target_names:
            raise CropYieldError(f"{source}: need at least one feature column and one target column")
        if self.data_path is not None:  # a folder's files: columns by name, in any order
            targets = self.target_names if self._no_targets is None else ()
            check_files(self._files, [*self.input_names, *targets], columns if inferred else None)
        given = {str(c): tuple(str(v) for v in values) for c, values in (levels or {}).items()}
        if categorical_names is None:
            categorical_names = text_columns(self._files[0], self.input_names) if self.data_path else ()
        categorical_names = [*categorical_names, *(c for c in given if c not in categorical_names)]
        unknown = [c for c in categorical_names if c not in self.input_names]
        if unknown:
            raise CropYieldError(f"categorical_names {unknown} are not feature columns ({list(self.input_names)})")
        self.categorical_names = tuple(c for c in self.input_names if c in categorical_names)
        self._columns = tuple(columns)
        layout = Layout(self.input_names, self.target_names, self.categorical_names, missing)
        memory = self._memory or ((*FEATURE_NAMES, *TARGET_NAMES), torch.cat([INPUTS, TARGETS], 1))
        files = self._files if self.data_path is not None else None
        self._reader = RowReader(source, files, memory, layout, limit_rows, val_fraction, streaming, max_levels)
        if any(not values for values in given.values()):
            raise CropYieldError(f"levels must name at least one level per column, got {levels}")
        self._levels = given
        self._encoding: Encoding | None = None
        if set(self.categorical_names) <= set(given):  # nothing to learn
            self._encoding = Encoding(self.input_names, {c: given[c] for c in self.categorical_names})
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self._source: RowSource | None = None
        self._predict_source: tuple[Encoding, RowSource] | None = None
        self._checkpoint_source: tuple[Encoding, RowSource] | None = None
        self._statistics: QRFactor | None = None

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
    def encoding(self) -> Encoding:
        """How the raw input columns become the model's features; with categorical columns, the
        first use learns their levels from the training rows (one pass)."""
        if self._encoding is None:
            self._encoding = self._reader.learn(self._seed(), given=self._levels)
        return self._encoding

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The model's input columns: the numeric inputs and the categorical ones' 0/1 columns."""
        return self.encoding.feature_names

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def model_feature_names(self) -> tuple[str, ...] | None:
        """``feature_names`` as the CLI gives them to the model it builds: None while the levels of
        streamed categorical columns are still to be learned. The model is then sized in ``setup``
        (``in_features=None``), where under DDP each process reads only its share of the pieces and
        the levels found are gathered; learning them now, before the processes connect, every
        process would read every piece."""
        return None if self._encoding is None and self.streaming else self.feature_names

    @property
    def model_num_features(self) -> int | None:
        """``num_features`` as the CLI gives it to the model (see :attr:`model_feature_names`)."""
        names = self.model_feature_names
        return None if names is None else len(names)

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    @property
    def dropped(self) -> str | None:
        """With ``missing="drop"``: the line saying how many rows a missing cell left out, per column."""
        return self._reader.dropped

    @property
    def units(self) -> str | None:
        """The targets' unit, where known: the tutorial's for its embedded rows, else None."""
        return TUTORIAL_UNITS if self.data_path is None and self._memory is None else None

    @property
    def uses_fast_path(self) -> bool:
        return isinstance(self._source, TableSource) and self._source.uses_fast_path

    def setup(self, stage: str) -> None:
        if stage == "predict":
            return  # built by predict_dataloader: a checkpoint given to the Trainer is restored by then
        self.check_targets()
        if self._source is not None:
            return
        if self._encoding is None:  # here every process is present: each reads its share of the pieces
            self._encoding = self._reader.learn(self._seed(), *self._rank_and_world(), given=self._levels)
        self._source = self._reader.fit_source(
            self.encoding, self._seed(), self.fast_path_min_rows, *self._rank_and_world(), self._dtype()
        )  # every process is here: a first pass still to be made is shared
        self._agree_across_processes()
        if self.dropped and (self.trainer is None or self.trainer.is_global_zero):
            print(self.dropped, flush=True)
        if self.standardize and self.feature_mean is None:
            mean, std = self.statistics().feature_scale()
            numeric = torch.from_numpy(self.encoding.numeric)
            self.feature_mean = torch.where(numeric, mean, 0).float()
            self.feature_std = torch.where(numeric, std, 1).float()

    def check_targets(self) -> None:
        """Raises the one-line error naming the target columns the data lacks: every stage but
        ``predict`` needs them (its ``setup`` checks; the CLI checks before building a Trainer)."""
        if self._no_targets is not None:
            raise self._no_targets

    def statistics(self) -> QRFactor:
        """The float64 QR factor of the training rows ``[features | 1 | targets]``, computed once:
        the least-squares optimum, ``standardize`` and the stable-step check all use it.
        Streaming, they take one pass over the files (each process reads its share under DDP)."""
        if self._statistics is None:
            if self._source is None:
                raise RuntimeError("call setup('fit') first")
            # A pass over files shows the Trainer's bar for long work (the CLI's), if it has one.
            bar = getattr(self.trainer.progress_bar_callback, "pass_bar", None) if self.trainer else None
            self._statistics = self._source.statistics(*self._rank_and_world(), progress=bar)
        return self._statistics

    @property
    def statistics_in_hand(self) -> bool:
        """Whether :meth:`statistics` costs no pass over files: computed already, or rows in memory."""
        return self._statistics is not None or not getattr(self._source, "statistics_cost_a_pass", False)

    def training_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training inputs and targets (views into one table); call after ``setup("fit")``.
        Not available when streaming: the rows are never all in memory."""
        if not isinstance(self._source, TableSource):
            raise RuntimeError("call setup('fit') first" + ("; not available when streaming" * self.streaming))
        train = self._source.train
        return train[:, : self.num_features], train[:, self.num_features :]

    def train_dataloader(self):
        exact = getattr(self.trainer and self.trainer.lightning_module, "exact_pass", False)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        options = LoaderOptions(
            self.batch_size, self.shuffle, self._seed(), self.fast_path_min_rows, self.shuffle_buffer
        )
        loader = self._ready(self._source).train_loader(options, *self._rank_and_world(), exact=exact, device=device)
        return self._chunked(loader) if isinstance(loader, Resumable) else loader

    def val_dataloader(self):
        return self._eval_source().eval_loader(self.batch_size, *self._rank_and_world())

    def test_dataloader(self):
        return self._eval_source().eval_loader(self.batch_size, *self._rank_and_world())

    def predict_dataloader(self):
        encoding = self._model_encoding() or self.encoding
        if self._predict_source is None or self._predict_source[0] != encoding:
            targets = self.target_names if all(t in self._columns for t in self.target_names) else ()
            source = self._reader.predict_source(encoding, targets, self._seed(), self.fast_path_min_rows)
            self._predict_source = (encoding, source)
        return self._predict_source[1].eval_loader(self.batch_size, *self._rank_and_world())

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

    @staticmethod
    def _ready(source: RowSource | None) -> RowSource:
        if source is None:
            raise RuntimeError("call setup() first")
        return source

    def _model_encoding(self) -> Encoding | None:
        """The encoding of the Trainer's model when it has categorical columns (a checkpoint's levels)."""
        spec = getattr(self.trainer.lightning_module if self.trainer is not None else None, "encoding", None)
        return Encoding.from_dict(spec) if spec else None

    def _eval_source(self) -> RowSource:
        """The held-out rows, encoded as the model was trained (validate/test from a checkpoint
        whose levels differ from those learned here read them again with the checkpoint's)."""
        source, encoding = self._ready(self._source), self._model_encoding()
        if encoding is None or encoding == self.encoding:
            return source
        if self._checkpoint_source is None or self._checkpoint_source[0] != encoding:
            rows = self._reader.fit_source(encoding, self._seed(), self.fast_path_min_rows, dtype=self._dtype())
            self._checkpoint_source = (encoding, rows)
        return self._checkpoint_source[1]

    def _agree_across_processes(self) -> None:
        """Under DDP every process must encode alike: the levels are gathered and compared."""
        if self.trainer is None or self.trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, self.encoding.to_dict())  # every process is here
        for rank, other in enumerate(gathered):
            if other != gathered[0]:
                raise CropYieldError(
                    f"process {rank} found other categorical levels than process 0 ({other['levels']} vs "
                    f"{gathered[0]['levels']}): every process must read the same data"
                )

    def _dtype(self) -> torch.dtype:
        """float64 for a model that asks for it (the exact solver: every digit of the files), else float32."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(model, "data_dtype", torch.float32)

    def _seed(self) -> int:
        return self.seed if self.seed is not None else torch.initial_seed() % 2**63

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size


def default_names(count: int, tutorial: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """The tutorial's column names when there are as many, else ``prefix_0, prefix_1, ...``."""
    return tutorial if count == len(tutorial) else tuple(f"{prefix}_{i}" for i in range(count))
