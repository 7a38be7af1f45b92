"""CropYieldCheckpoint: when checkpoints are written (steps, the fit's end, a signal) and earlier runs kept.

How the bytes reach a file or a bucket is :mod:`cropyield.checkpoint_io`'s.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from cropyield import storage
from cropyield.errors import CropYieldError
from cropyield.inference import read_checkpoint

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
