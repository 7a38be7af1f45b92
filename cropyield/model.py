"""The SGD regressors, sharing one ``self.linear`` layout with the exact one (:mod:`cropyield.exact`):
``nn.Linear`` + MSE + SGD (automatic) and its manual-optimization twin from the tutorial."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from typing_extensions import override

from cropyield.batches import Chunk, Chunks
from cropyield.data import FEATURE_NAMES, TARGET_NAMES, default_names
from cropyield.errors import CropYieldError, CropYieldWarning, TrainingDivergedError
from cropyield.graph import ChunkGraph, layout

CHECKPOINT_FORMAT = 1


class BaseRegressor(L.LightningModule):
    """What every cropyield regressor shares: ``self.linear``, the input scaler, names and evaluation.

    The subclasses differ only in how they train; one checkpoint layout serves them all, so
    :func:`~cropyield.inference.load_regressor`, ``cropyield-predict`` and the exports read any of them.
    """

    def __init__(
        self,
        in_features: int | None = 3,
        out_features: int = 2,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        standardize: bool = False,
        units: str | None = None,
        **hparams,
    ) -> None:
        super().__init__()
        if in_features is None and feature_names is not None:
            in_features = len(feature_names)
        # First, so that it draws its initial weights from the RNG exactly as the tutorial's does.
        # in_features=None: sized by the data module when the Trainer sets the model up (see `_size`).
        self.linear = nn.Linear(in_features, out_features) if in_features is not None else nn.LazyLinear(out_features)
        if feature_names is not None:
            feature_names = tuple(feature_names)
        elif in_features is not None:
            feature_names = default_names(in_features, FEATURE_NAMES, "feature")
        target_names = (
            tuple(target_names) if target_names is not None else default_names(out_features, TARGET_NAMES, "target")
        )
        if (in_features is not None and len(feature_names) != in_features) or len(target_names) != out_features:
            raise CropYieldError(
                f"{len(feature_names)} feature names and {len(target_names)} target names do not match "
                f"in_features={in_features} and out_features={out_features}"
            )
        # Plain values only, so a checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "in_features": in_features,
                "out_features": out_features,
                **hparams,
                "feature_names": None if feature_names is None else list(feature_names),
                "target_names": list(target_names),
                "standardize": bool(standardize),
                "units": None if units is None else str(units),
            }
        )
        self.register_buffer("feature_mean", torch.zeros(in_features or 0))
        self.register_buffer("feature_std", torch.ones(in_features or 0))
        self.val_metrics = _metrics(out_features)
        self.test_metrics = _metrics(out_features)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 rows (the exact solver's) are evaluated by the float32 layer; float32 ones pass as they are.
        return self.linear(self._scale(x.to(self.linear.weight.dtype)))

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    @override
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    @override
    def setup(self, stage: str) -> None:
        _quiet_lightning()
        if self.hparams.in_features is None:
            self._size(self.trainer.datamodule)
        if stage == "fit" and self.hparams.standardize:
            dm = self.trainer.datamodule
            if getattr(dm, "feature_mean", None) is None:
                raise CropYieldError(
                    "the model was created with standardize=True but the data module computed no "
                    "feature statistics: use CropYieldDataModule(standardize=True)"
                )
            self.feature_mean.copy_(dm.feature_mean)
            self.feature_std.copy_(dm.feature_std)
        if stage == "fit":
            self._adopt_encoding(getattr(self.trainer.datamodule, "encoding", None))
        if stage == "fit" and self.hparams.units is None:
            # Recorded in the checkpoint's hyper-parameters: what cropyield-predict prints after yields.
            self.hparams.units = getattr(self.trainer.datamodule, "units", None)

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        # The logged step counts optimizer steps under chunked training too, with any Trainer.
        from cropyield.callbacks import RealSteps  # callbacks imports this module

        return [RealSteps()]

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name, tensor in checkpoint["state_dict"].items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingDivergedError(
                    f"training diverged by epoch {self.current_epoch + 1}, step {self.global_step}: {name} became "
                    f"non-finite, so no checkpoint was written; {_REMEDY}"
                )
        checkpoint["cropyield"] = {
            "format": CHECKPOINT_FORMAT,
            "class": type(self).__name__,
        }
        if self.encoding is not None:  # plain lists and strings: loads with weights_only=True
            checkpoint["cropyield"]["encoding"] = self.encoding

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.encoding = (checkpoint.get("cropyield") or {}).get("encoding")

    encoding: dict | None = None  # the raw input columns and categorical levels (Encoding.to_dict)

    def _size(self, dm) -> None:
        """Builds the layer of a model created with ``in_features=None`` for the data's encoded columns.

        Here, in ``setup``, every DDP process is connected and the data module has learned the
        levels (each process from its share of the pieces, the levels found gathered); the weights
        are made before the checkpoint restores them, the optimizer and DDP's wrapping.
        """
        names = getattr(dm, "feature_names", None)
        if names is None:
            raise CropYieldError("a model created with in_features=None takes its size from a CropYieldDataModule")
        self.linear = nn.Linear(len(names), self.hparams.out_features)
        self.feature_mean, self.feature_std = torch.zeros(len(names)), torch.ones(len(names))  # the buffers
        # Saved again (not only set): the logged hyper-parameters are those saved, logged after setup.
        self.save_hyperparameters({**self.hparams, "in_features": len(names), "feature_names": list(names)})

    def _adopt_encoding(self, encoding) -> None:
        """Takes the data's encoding of categorical columns, which predictions then apply to raw rows."""
        if encoding is None or not encoding.categorical:
            return
        if tuple(self.hparams.feature_names) != encoding.feature_names:
            raise CropYieldError(
                f"the model's feature_names {list(self.hparams.feature_names)[:6]} are not the data's encoded "
                f"columns {list(encoding.feature_names)[:6]}: build the model with feature_names=dm.feature_names"
            )
        if self.encoding is not None and self.encoding != encoding.to_dict():
            raise CropYieldError("the data's categorical levels differ from those this model was trained on")
        self.encoding = encoding.to_dict()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.standardize:
            return (x - self.feature_mean) / self.feature_std
        return x

    def _evaluate(self, batch, metrics: MetricCollection) -> None:
        x, y = batch
        preds = self(x)
        metrics.update(preds, y.to(preds.dtype))

    def _log_metrics(self, stage: str, collection: MetricCollection) -> None:
        values = collection.compute()
        collection.reset()
        logged = {}
        for name, per_target in values.items():
            per_target = per_target.reshape(-1)
            logged[f"{stage}/{name}"] = per_target.mean()
            for target, value in zip(self.hparams.target_names, per_target, strict=True):
                logged[f"{stage}/{name}_{target}"] = value
        self.log_dict(logged)


class CropYieldRegressor(BaseRegressor):
    """Linear regression of crop yields, trained with SGD on the mean squared error.

    Args:
        in_features: number of input columns (temperature, rainfall, humidity in the tutorial).
            None: the data module's, taken when the Trainer sets the model up (the CLI leaves it
            to then while the levels of streamed categorical columns are still to be learned).
        out_features: number of targets (apples, oranges in the tutorial).
        lr: SGD learning rate; the tutorial's 1e-5 suits its raw inputs. Above about 1.1e-4 SGD
            diverges on them; with standardized inputs 0.1 converges fast.
        feature_names: names of the inputs, recorded in checkpoints. Default: the tutorial's when
            there are 3, else ``feature_0, ...``.
        target_names: names of the targets, used in metric names and predictions. Default: the
            tutorial's when there are 2, else ``target_0, ...``.
        standardize: standardize inputs with the per-feature mean and std that the
            ``CropYieldDataModule(standardize=True)`` computes; stored in the checkpoint, so it
            predicts on raw inputs.
        cuda_graph: on one CUDA device, capture the optimizer steps of a chunk of batches (see the
            data module's ``steps_per_call``) in a CUDA graph and replay it for every full chunk:
            the same kernels, launched at once. Per-step backward and optimizer hooks do not run.
            Ignored, with a warning, where it cannot apply (CPU, DDP, mixed precision, one batch a call).
        units: the unit of the targets' values, recorded in checkpoints and printed by
            ``cropyield-predict`` (e.g. ``hg/ha``). None takes the data module's when fitting: the
            tutorial's "tons per hectare" for its embedded rows, none for other data.
    """

    def __init__(
        self,
        in_features: int | None = 3,
        out_features: int = 2,
        lr: float = 1e-5,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        standardize: bool = False,
        cuda_graph: bool = False,
        units: str | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            feature_names,
            target_names,
            standardize,
            units,
            lr=float(lr),
            cuda_graph=bool(cuda_graph),
        )
        if not lr > 0:
            raise CropYieldError(f"lr must be positive, got {lr}")
        self._loss_sum, self._loss_rows = 0.0, 0  # this epoch's training loss, summed over its rows

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, Chunk):
            return self._chunk_step(batch, lambda x, y: F.mse_loss(self(x), y))
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self._track(loss, len(x))
        return loss

    training_step.handles_chunks = True  # the data module may give it several batches at once
    _made_manual = False
    _graph: ChunkGraph | None = None
    _use_graph = False
    _graph_devices = ("cuda",)  # where cuda_graph applies (the CPU tests add "cpu": eager steps, static buffers)

    @override
    def on_train_start(self) -> None:
        # Several optimizer steps in one call need manual optimization; one batch a call keeps
        # the automatic optimization of the tutorial. (Left as set after the fit: Lightning reads
        # `global_step` from the counter of the current mode.)
        chunked = isinstance(self.trainer.train_dataloader, Chunks)
        if chunked and self.automatic_optimization:
            self.automatic_optimization, self._made_manual = False, True
        elif not chunked and self._made_manual:
            self.automatic_optimization, self._made_manual = True, False
        self._graph, self._use_graph = None, False  # a graph holds this fit's parameters and optimizer
        if self.hparams.get("cuda_graph"):
            why_not = self._why_no_graph(chunked)
            if why_not:
                rank_zero_warn(
                    f"cuda_graph=True has no effect: {why_not}; the steps run eagerly", category=CropYieldWarning
                )
            self._use_graph = not why_not

    @override
    def on_train_epoch_start(self) -> None:
        # The epoch's mean training loss is summed in `_track` and logged once an epoch: `self.log`
        # on every step costs about 0.7 ms on a CPU, a quarter of a 65,536-row step.
        self._loss_sum, self._loss_rows = 0.0, 0

    @override
    def on_train_epoch_end(self) -> None:
        if self._loss_rows:
            self.log("train/loss", self._loss_sum / self._loss_rows, sync_dist=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def _chunk_step(self, chunk: Chunk, loss_fn) -> torch.Tensor:
        """One optimizer step per batch of the chunk, as one batch per call would take them.

        The losses are checked once per chunk (one host sync, not one per step on a GPU); a run that
        diverged inside the chunk stops there, and the checkpoint guard refuses its weights.
        """
        optimizer = self.optimizers()
        graph = self._graph_for(chunk, loss_fn, optimizer.optimizer) if self._use_graph else None
        if graph is not None:
            losses = graph(chunk).clone()  # the graph's output buffer is rewritten by the next chunk
            steps = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            for _ in chunk:  # what Lightning's optimizer wrapper counts for each step
                steps.increment_ready()
                steps.increment_completed()
            sizes = [len(x) for x, _ in chunk]
        else:
            losses, sizes = [], []
            for x, y in chunk:
                if 0 <= self.trainer.max_steps <= self.global_step:  # never step past max_steps
                    break
                loss = loss_fn(x, y)
                self.manual_backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
                sizes.append(len(x))
            losses = torch.stack(losses)
        values = losses.tolist()
        first = self.global_step - len(values) + 1  # the step of the chunk's first batch
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"training diverged at epoch {self.current_epoch + 1}, step {first + i}: the loss is {value}; "
                    f"{_REMEDY}"
                )
        self._loss_sum += sum(v * n for v, n in zip(values, sizes, strict=True))
        self._loss_rows += sum(sizes)
        return losses[-1]

    def _why_no_graph(self, chunked: bool) -> str | None:
        optimizer = self.trainer.optimizers[0] if len(self.trainer.optimizers) == 1 else None
        if not chunked:
            return "training_step gets one batch a call (steps_per_call=1, or too few rows for the fast path)"
        if self.device.type not in self._graph_devices:
            return f"training runs on {self.device.type}, not CUDA"
        if type(self.trainer.strategy) is not SingleDeviceStrategy:
            return f"it needs one device, not the {type(self.trainer.strategy).__name__}"
        if self.trainer.precision != "32-true":
            return f"it needs 32-bit precision, not {self.trainer.precision}"
        if not (
            isinstance(optimizer, TutorialSGD)
            or (type(optimizer) is torch.optim.SGD and all(g["momentum"] == 0 for g in optimizer.param_groups))
        ):
            return "it needs plain SGD without momentum (an optimizer without state)"
        return None

    def _graph_for(self, chunk: Chunk, loss_fn, optimizer: torch.optim.Optimizer) -> ChunkGraph | None:
        """The graph of this fit for a full chunk that fits under ``max_steps``; None for the rest
        (the epoch's last chunk when shorter, or holding a shorter batch), which run eagerly."""
        if 0 <= self.trainer.max_steps < self.global_step + len(chunk):
            return None
        if self._graph is None:
            full = len(chunk) == self.trainer.train_dataloader.steps and len({len(x) for x, _ in chunk}) == 1
            if not full:
                return None
            self._graph = ChunkGraph(loss_fn, optimizer, chunk)
        return self._graph if self._graph.layout == layout(chunk) else None

    def _track(self, loss: torch.Tensor, rows: int) -> None:
        """Stops a diverging run at this step, before its update; adds the loss to the epoch's mean."""
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"training diverged at epoch {self.current_epoch + 1}, step {self.global_step + 1}: "
                f"the loss is {value}; {_REMEDY}"
            )
        self._loss_sum += value * rows
        self._loss_rows += rows


_REMEDY = "lower the learning rate (--model.lr) or standardize the inputs (--data.standardize true)"


class TutorialSGD(torch.optim.Optimizer):
    """The tutorial's hand-written update as an optimizer: ``p -= p.grad * lr``.

    Going through an optimizer lets Lightning count the steps (``global_step``, ``max_steps``,
    step logging and checkpoints); the arithmetic is exactly the tutorial's, bit for bit.
    """

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p -= p.grad * group["lr"]
        return loss


class ManualSGDRegressor(CropYieldRegressor):
    """The tutorial's from-scratch training step under Lightning's manual optimization.

    ``preds = x @ w.t() + b``, the hand-written MSE, backward, then ``w -= w.grad * lr`` and
    ``b -= b.grad * lr`` and the gradients zeroed, with ``w, b`` the ``linear`` layer's weight and
    bias, so checkpoints have the same layout as :class:`CropYieldRegressor`'s.

    Args:
        in_features: number of input columns (None: the data module's, when the model is set up).
        out_features: number of targets.
        lr: the step size of the hand-written update.
        feature_names: names of the inputs, recorded in checkpoints.
        target_names: names of the targets, used in metric names and predictions.
        standardize: standardize inputs with the data module's feature statistics.
        cuda_graph: on one CUDA device, replay each chunk's steps as one CUDA graph (as for
            :class:`CropYieldRegressor`).
        units: the unit of the targets' values (as for :class:`CropYieldRegressor`).
    """

    def __init__(
        self,
        in_features: int | None = 3,
        out_features: int = 2,
        lr: float = 1e-5,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        standardize: bool = False,
        cuda_graph: bool = False,
        units: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, lr, feature_names, target_names, standardize, cuda_graph, units)
        self.automatic_optimization = False

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, Chunk):
            return self._chunk_step(batch, self._tutorial_loss)
        x, y = batch
        loss = self._tutorial_loss(x, y)
        self._track(loss, len(x))
        self.manual_backward(loss)
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    training_step.handles_chunks = True

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return TutorialSGD(self.parameters(), lr=self.hparams.lr)

    def _tutorial_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        preds = self._scale(x) @ w.t() + b
        diff = preds - y
        return torch.sum(diff * diff) / diff.numel()


def _metrics(num_targets: int) -> MetricCollection:
    # Per-target values; the overall figure logged is their mean (every target has the same rows).
    return MetricCollection(
        {
            "mse": MeanSquaredError(num_outputs=num_targets),
            "mae": MeanAbsoluteError(num_outputs=num_targets),
            "r2": R2Score(multioutput="raw_values"),
        },
        compute_groups=False,
    )


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@rank_zero_only
def _quiet_lightning() -> None:
    """Silences Lightning output that says nothing about a cropyield run."""
    # Two advertisements (litlogger, litmodels) printed when a Trainer is built.
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    # Lightning's own use of a torch API it has not caught up with; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Every metric is logged per epoch, so the per-step logging interval does not apply.
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging",
    )
    # Step checkpoints of the manual variants hold the weights after the step, as the automatic
    # variant's do; the exact solver's "step" changes no weight.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train")
    # The rows are in-memory tensors: worker processes would only add inter-process copies.
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")


# Now, for the Trainer built before any hook runs; `setup` repeats it for warning filters that
# were reset since (pytest resets them around every test).
_quiet_lightning()


def __getattr__(name: str):
    # The exact regressor moved to cropyield.exact; configs and code naming cropyield.model's still work.
    if name in ("LeastSquaresRegressor", "LeastSquaresStatistics"):
        from cropyield import exact

        return getattr(exact, name)
    raise AttributeError(f"module 'cropyield.model' has no attribute {name!r}")
