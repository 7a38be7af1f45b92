"""Callbacks the CLI and the scripts add to the Trainer: progress, step timing, prediction writing."""

from __future__ import annotations

import csv
import functools
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from cropyield.batches import Chunk, Chunks
from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError, CropYieldWarning
from cropyield.model import BaseRegressor
from cropyield.reference import QRFactor
from cropyield.solution import max_stable_lr, solve


class ProgressReport(Callback):
    """Prints the tutorial's progress lines and ends a fit with the least-squares comparison.

    - before training: warns when the learning rate is above the largest stable SGD step for the
      data (2 / the largest eigenvalue of the loss's Hessian);
    - every ``every_n_epochs`` epochs: ``Epoch [10/100], Loss: 860.4821``, the loss of the epoch's
      last batch, as the tutorial prints it;
    - after training: R² per target and the final training MSE next to the least-squares optimum on
      the same rows, both from the data's float64 QR factor (no second pass over the rows); after
      an exact fit (ordinary least squares), its statistics table (``LeastSquaresRegressor.summary``).

    Args:
        every_n_epochs: print a progress line every this many epochs (0: never).
        print_summary: print the final-MSE line when fit ends; it is kept in ``summary`` either way.
    """

    def __init__(self, every_n_epochs: int = 10, print_summary: bool = True) -> None:
        self.every_n_epochs = every_n_epochs
        self.print_summary = print_summary
        self.summary: str | None = None
        self._last_loss: torch.Tensor | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank takes the same branch: a streamed statistics pass gathers across processes.
        if "lr" not in pl_module.hparams:
            return
        dm = trainer.datamodule
        if not getattr(dm, "statistics_in_hand", True):
            return  # the check would cost a pass over the files; standardize=True computes them anyway
        moments = _statistics(trainer, pl_module)
        if moments is None:
            return
        lr = pl_module.hparams.lr
        bound = max_stable_lr(moments)
        if lr > bound:
            rank_zero_warn(
                f"lr={lr:g} is above the largest stable SGD step for this data ({bound:.3g}); training "
                "will likely diverge: lower the learning rate or standardize the inputs",
                category=CropYieldWarning,
            )

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and self._last_loss is not None:
            if trainer.is_global_zero:
                print(f"Epoch [{epoch}/{trainer.max_epochs}], Loss: {self._last_loss.item():.4f}", flush=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Computed on every rank (a streamed pass gathers the ranks' shares), printed on rank 0.
        moments = _statistics(trainer, pl_module)
        if moments is None or not trainer.is_global_zero:
            return
        weight, bias = pl_module.linear.weight.detach(), pl_module.linear.bias.detach()
        final = moments.mse(weight, bias)
        r2 = moments.r2(weight, bias)
        # The least-squares optimum (through the origin for such a model), whatever the model's own l2.
        optimum = solve(moments, fit_intercept=pl_module.hparams.get("fit_intercept", True)).mse
        names = pl_module.hparams.target_names
        self.summary = (
            "Training R²: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, r2.tolist(), strict=True)) + "\n"
            f"Final training MSE: {float(final.mean()):.4f} (least-squares optimum on the same rows: {optimum:.4f})"
        )
        table = getattr(pl_module, "summary", None)
        if callable(table) and getattr(pl_module, "factor", None) is not None and pl_module.hparams.l2 == 0:
            if pl_module.solution is not None and not pl_module.solution.problems:
                self.summary += "\n\n" + str(table())
        if self.print_summary:
            print(self.summary, flush=True)


def _statistics(trainer: L.Trainer, pl_module: L.LightningModule) -> QRFactor | None:
    """The training rows' factor, as the model sees them (standardized when it standardizes): the
    exact solver's own, else the data module's."""
    if not isinstance(pl_module, BaseRegressor):
        return None
    factor = getattr(pl_module, "factor", None)
    if factor is None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "statistics"):
            return None
        factor = dm.statistics()
    if pl_module.hparams.standardize:
        factor = factor.scaled(pl_module.feature_mean, pl_module.feature_std)
    return factor


class LongWorkProgressBar(TQDMProgressBar):
    """Lightning's progress bar, shown only for work that lasts: a bar appears once its epoch (or
    validation, test, predict run) has taken ``delay`` seconds, so the tutorial's 3-batch epochs
    print nothing. It counts batches, also when several are trained in one call (chunked steps),
    and shows the rows per second.

    Args:
        delay: seconds a bar stays hidden after its epoch or run starts.
    """

    def __init__(self, delay: float = 3.0, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.delay = delay
        self._batches, self._rows, self._start = 0, 0, time.perf_counter()

    @property
    @override
    def total_train_batches(self):
        loader = self.trainer.train_dataloader
        if isinstance(loader, Chunks):
            return len(loader.loader)  # batches, not the calls that train them
        return super().total_train_batches

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        return self._delayed(super().init_sanity_tqdm)

    @override
    def init_train_tqdm(self) -> Tqdm:
        return self._delayed(super().init_train_tqdm)

    @override
    def init_validation_tqdm(self) -> Tqdm:
        return self._delayed(super().init_validation_tqdm)

    @override
    def init_test_tqdm(self) -> Tqdm:
        return self._delayed(super().init_test_tqdm)

    @override
    def init_predict_tqdm(self) -> Tqdm:
        return self._delayed(super().init_predict_tqdm)

    def pass_bar(self, pieces: int) -> Tqdm:
        """A bar for a pass that Lightning's loops do not run (a streamed statistics pass: the data
        module's for ``standardize``, the closing report's), drawn as the epoch bar is: only once it
        has lasted ``delay`` seconds. It counts the pieces read (row groups, CSV blocks), with the
        rows per second; ``advance(rows)`` after each."""
        return _PassBar(
            desc="Statistics pass",
            total=pieces,
            delay=self.delay,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def _delayed(self, make) -> Tqdm:
        # Lightning's bar with its own settings, built as a _DelayedTqdm: a bar built with tqdm's
        # default draws itself at once, before it could be told to wait.
        module = sys.modules[TQDMProgressBar.__module__]
        module.Tqdm = functools.partial(_DelayedTqdm, delay=self.delay)
        try:
            return make()
        finally:
            module.Tqdm = Tqdm

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._batches, self._rows, self._start = 0, 0, time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        batches = batch if isinstance(batch, Chunk) else [batch]
        self._batches += len(batches)
        self._rows += sum(len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in batches)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(self._batches, bar.total):
            bar.n = self._batches
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        seconds = time.perf_counter() - self._start
        if trainer.training and self._rows and seconds > 0:
            metrics["rows/s"] = _per_second(self._rows, seconds)
        return metrics


def _per_second(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}"


class _DelayedTqdm(Tqdm):
    """A bar that draws nothing until ``delay`` seconds after it was (re)started: Lightning redraws
    it with ``refresh()``, which tqdm's own ``delay`` does not hold back."""

    def refresh(self, *args, **kwargs):
        if self.disable:  # another rank's bar: tqdm set nothing else up
            return super().refresh(*args, **kwargs)
        if self._time() < getattr(self, "start_t", 0.0) + self.delay:
            return None
        self.last_print_t = self._time()  # tqdm's close() then draws the final state and a newline
        return super().refresh(*args, **kwargs)


class _PassBar(_DelayedTqdm):
    _rows = 0

    def advance(self, rows: int) -> None:
        if self.disable:  # another rank's bar: tqdm set nothing else up
            return
        self._rows += rows
        seconds = self._time() - self.start_t
        if seconds > 0:
            self.set_postfix({"rows/s": _per_second(self._rows, seconds)}, refresh=False)
        self.update(1)


class RealSteps(Callback):
    """Makes the step that loggers record (``metrics.csv``'s ``step``) count optimizer steps, as
    ``global_step`` does, also when one ``training_step`` call trains a chunk of batches. The
    package's regressors add it themselves (``configure_callbacks``), with any Trainer."""

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if isinstance(batch, Chunk):
            # Lightning adds one per call after this hook: the total is then global_step.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step - 1


class StepTimer(Callback):
    """Prints the mean wall time per training step: from each epoch's start to its last step's end
    (validation and checkpointing excluded), the first epoch (warm-up) excluded.

    Add it from the command line with ``--trainer.callbacks+=cropyield.callbacks.StepTimer``.
    """

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0
        self._start: float | None = None
        self._first_step = 0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            _synchronize(pl_module.device)
            self._start, self._first_step = time.perf_counter(), trainer.global_step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is not None and batch_idx == trainer.num_training_batches - 1:
            _synchronize(pl_module.device)
            self.seconds += time.perf_counter() - self._start
            self.steps += trainer.global_step - self._first_step
            self._start = None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.steps and trainer.is_global_zero:
            print(
                f"Step time: {1e3 * self.seconds / self.steps:.3f} ms per training step "
                f"({self.steps} steps after the first epoch)",
                flush=True,
            )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CSVPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to a CSV: the raw input columns plus one column per target.

    A categorical column is written as its level (``Potatoes``), as the input had it, not as the
    model's 0/1 columns; a number as the shortest text of the value the model read.

    Args:
        output_path: the CSV to write. Default: ``<trainer.default_root_dir>/predictions.csv``.
            Under DDP each process writes its own file, suffixed ``.rank<N>``. Written to a
            temporary file renamed at the end, so a failed run leaves no half-written file; never
            the data file (or inside the data folder) being predicted.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file = None
        self._writer = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output_path or Path(trainer.default_root_dir) / "predictions.csv")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
        data = getattr(trainer.datamodule, "data_path", None)
        if data is not None and (
            os.path.realpath(path) == os.path.realpath(data)
            or (path.exists() and os.path.samefile(path, data))
            or (os.path.isdir(data) and os.path.realpath(path).startswith(os.path.realpath(data) + os.sep))
        ):
            raise CropYieldError(
                f"--prediction_writer.output_path {path} would overwrite or join the data being predicted ({data}); "
                "write the predictions elsewhere"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "w", newline="", encoding="utf-8")  # closed in on_predict_end
        self._writer = csv.writer(self._file)
        spec, names = getattr(pl_module, "encoding", None), tuple(pl_module.hparams.feature_names)
        # The model's encoding (a checkpoint's), else the data's when the model reads its columns (a
        # model not trained yet), else the model's columns as they are.
        encoding = Encoding.from_dict(spec) if spec else getattr(trainer.datamodule, "encoding", None)
        self._encoding = (
            encoding if isinstance(encoding, Encoding) and encoding.feature_names == names else Encoding(names)
        )
        self._writer.writerow([*self._encoding.columns, *pl_module.hparams.target_names])

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs = zip(*self._encoding.decode(x.cpu().numpy()), strict=True)
        self._writer.writerows([*row, *p] for row, p in zip(inputs, prediction.cpu().tolist(), strict=True))

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
            print(f"wrote predictions to {self.path}", flush=True)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._file is not None:  # a failed prediction: nothing written, an earlier file kept
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
