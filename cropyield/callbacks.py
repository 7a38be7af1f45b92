"""Callbacks and the checkpoint-IO plugin that the CLI and the scripts add to the Trainer."""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from cropyield import storage
from cropyield.batches import Chunk, Chunks
from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError, CropYieldWarning
from cropyield.inference import read_checkpoint
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


_interruption: dict[str, Any] = {}  # the signal that stopped the last fit, and what was saved


def interruption() -> dict[str, Any]:
    """The signal that stopped the last fit in this process (``signum``, ``path`` saved, ``step``, the
    process's ``rank``), or {}."""
    return dict(_interruption)


class CropYieldCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always ends up holding the fit's final weights, and
    the weights of the step reached when a signal stops the fit.

    Lightning's writes ``last.ckpt`` at its save points only (every N steps, epochs) and once more at
    the end only when it never wrote one: a 2,400-step run saved every 7 steps keeps step 2,394's.
    Here the end of training writes ``last.ckpt`` again whenever steps were taken since the last save,
    and ``every_n_train_steps`` writes it from the first step on, before any validation.

    SIGTERM (Lightning's handler sets ``trainer.received_sigterm``) and SIGINT (handled here the same
    way, instead of a ``KeyboardInterrupt`` in the middle of a step) let the step under way finish;
    ``last.ckpt`` is then written as a step checkpoint would be, resumable with ``--ckpt_path last``,
    and the fit stops with :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`
    (``cropyield`` then exits with 128 + the signal's number); a training loader that cannot save its
    position (a plain ``DataLoader``) stops at the end of its epoch instead. Under DDP a signal is
    only noted where it lands, and the ranks agree on stopping at the same step (one small all-reduce
    per ``training_step`` call), then all save and stop there. A second signal while the checkpoint
    is written changes nothing: the write is atomic and not interrupted.
    """

    _signum: int | None = None
    _pending = 0  # under DDP: the signal noted since the ranks last agreed (0: none)
    _previous_sigint = None
    _stop_at_epoch_end = False

    keep_earlier = False  # set by the CLI for a fresh fit: see keep_earlier_run
    resuming = False  # set by the CLI for a fit given --ckpt_path

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.keep_earlier or self.resuming:
                # Lightning's warning that dirpath holds files (this run may replace them): here an
                # earlier run's are moved aside first, and a resumed run writes beside its own.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self._signum, self._stop_at_epoch_end, self._pending = None, False, 0
        _interruption.clear()
        version = getattr(trainer.logger, "version", None)
        self._run_name = f"version_{version}" if isinstance(version, int) else (version or None)
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            connector = trainer._signal_connector
            distributed = trainer.world_size > 1

            def on_signal(signum, frame) -> None:
                self._signum = self._signum or signum
                if distributed:
                    self._pending = self._pending or signum  # agreed on at the step's end: _stop_asked
                else:
                    connector.received_sigterm = True  # Lightning's loops then stop as on SIGTERM

            def on_sigterm(signum, frame) -> None:
                if not (self._pending or connector.received_sigterm) and trainer.strategy.launcher is not None:
                    trainer.strategy.launcher.kill(signum)  # Lightning's: on to the processes it started
                on_signal(signum, frame)

            self._previous_sigint = signal.signal(signal.SIGINT, on_signal)
            if distributed:
                # Lightning's own SIGTERM handler runs a broadcast inside the handler, wherever the
                # signal lands on each rank: matched against another rank's gradient all-reduce it
                # hung a 2-process fit until the process group's timeout. Used from the Trainer's
                # handler registration, which comes after this hook.
                connector._sigterm_notifier_fn = on_sigterm

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)
        super().teardown(trainer, pl_module, stage)

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.keep_earlier:
            self.keep_earlier = False
            kept = self.keep_earlier_run() if trainer.is_global_zero else None
            if kept:
                print(f"cropyield: {kept}", flush=True)
        super()._save_checkpoint(trainer, filepath)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The run's log version, so that a later run can keep this run's files under its name.
        return {**super().state_dict(), "run_name": getattr(self, "_run_name", None)}

    def keep_earlier_run(self) -> str | None:
        """Moves the checkpoints of an earlier run that this fit would replace (``last.ckpt``, the
        best and step checkpoints) into ``<dirpath>/<that run's log version>/``, in a local folder
        or on object storage alike; returns a line saying where, or None when there were none.
        Called on rank 0 before a fresh fit's first write."""
        if not self.dirpath:
            return None
        import fsspec

        fs, folder = fsspec.core.url_to_fs(str(self.dirpath))
        fs.invalidate_cache(folder)  # a listing cached earlier in this process may be stale
        if not fs.isdir(folder):
            return None
        prefix = (self.filename or "epoch=").split("{", 1)[0]
        ours = sorted(
            entry["name"]
            for entry in fs.ls(folder, detail=True)
            if entry["type"] == "file"
            and (name := entry["name"].rsplit("/", 1)[-1]).endswith(self.FILE_EXTENSION)
            and name.startswith((self.CHECKPOINT_NAME_LAST, prefix))
        )
        if not ours:
            return None
        names = [path.rsplit("/", 1)[-1] for path in ours]
        last = f"{str(self.dirpath).rstrip('/')}/{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        name = _run_name(last, fs, ours)
        target = name
        for i in range(1, 1000):
            if not fs.exists(f"{folder}/{target}"):
                break
            target = f"{name}-{i}"
        fs.makedirs(f"{folder}/{target}", exist_ok=True)
        # A move each: a local rename, or a server-side copy then a delete (nothing lost if cut short).
        for path, file in zip(ours, names, strict=True):
            fs.mv(path, f"{folder}/{target}/{file}")
        return (
            f"the earlier run's checkpoints ({', '.join(names)}) are kept in {str(self.dirpath).rstrip('/')}/{target}/"
        )

    @override
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Lightning lists a URL's folder with the filesystem of the dirpath given at construction
        # (local, when the CLI fills it in later) and returns the listing without its scheme
        # (bucket/key), so `--ckpt_path last` on a bucket silently started over.
        if not self.dirpath or not storage.is_url(str(self.dirpath)):
            return super()._find_last_checkpoints(trainer)
        import fsspec

        fs, folder = fsspec.core.url_to_fs(str(self.dirpath))
        fs.invalidate_cache(folder)
        last = re.compile(rf"{re.escape(self.CHECKPOINT_NAME_LAST)}(-\d+)?{re.escape(self.FILE_EXTENSION)}")
        try:
            names = [path.rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return set()
        return {f"{str(self.dirpath).rstrip('/')}/{name}" for name in names if last.fullmatch(name)}

    def _stop_asked(self, trainer: L.Trainer) -> bool:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return bool(trainer.received_sigterm)
        # Every rank here, at the same step: the signal noted on any rank stops them all (the
        # larger number when two differ, so that every rank exits with the same status).
        flag = torch.tensor([self._pending], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            self._signum, self._pending = agreed, 0
        return bool(agreed) or bool(trainer.received_sigterm)

    def _save_on_signal(self, trainer: L.Trainer) -> None:
        signum = self._signum or signal.SIGTERM
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        _interruption.update(
            signum=int(signum), path=self.last_model_path, step=trainer.global_step, rank=trainer.global_rank
        )

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
        # Here, where a step checkpoint is written, so that the interrupted run resumes as from one.
        if self._stop_asked(trainer):
            if hasattr(trainer.train_dataloader, "state_dict"):
                self._save_on_signal(trainer)
                raise SIGTERMException
            # A plain DataLoader resumes only from an epoch's end (its position is not saved): the
            # epoch is finished first (the tutorial's take milliseconds), then Lightning stops.
            trainer._signal_connector.received_sigterm = False
            self._stop_at_epoch_end = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._stop_at_epoch_end:
            trainer._signal_connector.received_sigterm = True  # the next epoch's start raises SIGTERMException

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A signal met outside a training step (validation, between epochs): the state there is an
        # epoch boundary's or a validation's, which Lightning resumes from too.
        if isinstance(exception, KeyboardInterrupt):
            self._signum = self._signum or signal.SIGINT
        elif not isinstance(exception, SIGTERMException):
            return
        if _interruption:
            pass  # saved where the ranks agreed to stop
        elif trainer.state.fn == "fit" and trainer.global_step > 0:
            self._save_on_signal(trainer)
        else:
            _interruption.update(
                signum=int(self._signum or signal.SIGTERM),
                path=None,
                step=trainer.global_step,
                rank=trainer.global_rank,
            )
        _await_started_ranks(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_checkpoint_saved and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def _await_started_ranks(trainer: L.Trainer) -> None:
    """On the process that launched the other DDP ranks (Lightning's subprocess launcher), stopped by
    a signal: waits for them to save and exit, so that its exit status is the whole run's.

    Lightning's observer thread SIGKILLs the launcher as soon as a rank it started exits with a
    non-zero status, which every rank stopped by a signal does (128 + N): it is disarmed first."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    procs = getattr(trainer.strategy.launcher, "procs", None)
    if not procs:
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._termination_signal = 0  # signal 0 only checks that a process exists
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)


def _run_name(last: str, fs, files: list[str]) -> str:
    """The log version recorded in an earlier run's ``last.ckpt`` (a path or URL), else its files' time."""
    try:
        states = read_checkpoint(last).get("callbacks", {}) if fs.isfile(last) else {}
    except CropYieldError:
        states = {}
    for state in states.values() if isinstance(states, dict) else []:
        name = state.get("run_name") if isinstance(state, dict) else None
        if isinstance(name, str) and name and "/" not in name and os.sep not in name and not name.startswith("."):
            return name
    newest = max(fs.modified(path).timestamp() for path in files)
    return time.strftime("run-%Y%m%d-%H%M%S", time.localtime(newest))


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
