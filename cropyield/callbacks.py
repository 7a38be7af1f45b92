"""Callbacks and the checkpoint-IO plugin that the CLI and the scripts add to the Trainer."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from cropyield.errors import CropYieldWarning
from cropyield.inference import read_checkpoint
from cropyield.model import BaseRegressor
from cropyield.reference import QRFactor, max_stable_lr, solve


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
        if "lr" not in pl_module.hparams or not trainer.is_global_zero:
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
        if not trainer.is_global_zero:
            return
        moments = _statistics(trainer, pl_module)
        if moments is None:
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


class CropYieldCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always ends up holding the fit's final weights.

    Lightning's writes ``last.ckpt`` at its save points only (every N steps, epochs) and once more at
    the end only when it never wrote one: a 2,400-step run saved every 7 steps keeps step 2,394's.
    Here the end of training writes ``last.ckpt`` again whenever steps were taken since the last save,
    and ``every_n_train_steps`` writes it from the first step on, before any validation.
    """

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning defers a step save until the monitored metric exists (after the first
        # validation, or never without one); last.ckpt is what a killed run resumes from, so it
        # is written at every step save regardless.
        every = self._every_n_train_steps
        if (
            self.save_last
            and every >= 1
            and trainer.global_step % every == 0
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_checkpoint_saved and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a crash cannot leave half-done, and integrity-checked, safe reads.

    Lightning writes through an fsspec transaction (a temporary file, then a move) without fsync,
    so a power loss can leave a renamed but empty file. Here the bytes go to a temporary file in
    the same folder, are flushed and fsynced, then ``os.replace`` swaps it in and the folder is
    fsynced. Reads go through :func:`cropyield.inference.read_checkpoint`: CRC-checked,
    ``weights_only=True``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @override
    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


class CSVPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to a CSV: the input columns plus one column per target.

    Args:
        output_path: the CSV to write. Default: ``<trainer.default_root_dir>/predictions.csv``.
            Under DDP each process writes its own file, suffixed ``.rank<N>``.
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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="", encoding="utf-8")  # closed in on_predict_end
        self._writer = csv.writer(self._file)
        self._writer.writerow([*pl_module.hparams.feature_names, *pl_module.hparams.target_names])

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._writer.writerows(torch.cat([x.cpu(), prediction.cpu()], dim=1).tolist())

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"wrote predictions to {self.path}", flush=True)
