"""The ``cropyield`` console command: LightningCLI over the data module and either model variant.

cropyield fit                                     # the tutorial run: 100 epochs, batch 5, SGD at 1e-5
cropyield fit --config from_scratch.yaml          # the manual-optimization variant (see configs/)
cropyield fit --config exact.yaml                 # the exact least-squares fit in one pass
cropyield fit --ckpt_path last                    # resume from checkpoints/last.ckpt
cropyield predict --ckpt_path checkpoints/last.ckpt

Under DDP (``--trainer.strategy ddp``, one machine or several nodes under torchrun or SLURM) a
collective that gets no answer from a peer for ``--ddp_timeout`` seconds (default 120) ends the
process with one line saying a peer was lost; relaunch every node with ``--ckpt_path last``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import re
import signal
import sys
import warnings
from datetime import timedelta
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from cropyield.arguments import (
    CONFIG_DIR,
    LINKS,
    check_agreement,
    checkpoint_file,
    given_keys,
    one_line,
    preprocess,
    saved_model,
    shipped_config,
)
from cropyield.callbacks import CSVPredictionWriter, LongWorkProgressBar, ProgressReport
from cropyield.checkpoint import CropYieldCheckpoint, interruption
from cropyield.checkpoint_io import AtomicCheckpointIO
from cropyield.data import CropYieldDataModule
from cropyield.errors import CropYieldError, CropYieldWarning, one_line_warnings
from cropyield.inference import _spec, read_checkpoint
from cropyield.model import BaseRegressor
from cropyield.storage import is_url, location

__all__ = ["CONFIG_DIR", "CropYieldCLI", "cli_main", "main", "shipped_config"]
DEFAULT_SEED = 42
DEFAULT_DDP_TIMEOUT = 120.0
# How a collective reports a peer that died or stopped answering (gloo, NCCL, the TCP store).
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out|timed out|NCCL.*(timeout|Watchdog)|"
    r"recvBytes|sendBytes|Socket Timeout",
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class CropYieldCLI(LightningCLI):
    """LightningCLI with cropyield's checkpointing, progress report and prediction writer built in."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CropYieldCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model": {"class_path": "cropyield.model.CropYieldRegressor"},
                "checkpoint.monitor": "val/mse",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                # Overwrite last.ckpt in place instead of writing last-v1.ckpt beside a stale one.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_argument(
            "--ddp_timeout",
            type=float,
            default=DEFAULT_DDP_TIMEOUT,
            help="under --trainer.strategy ddp: seconds a collective waits for a peer before the process "
            "ends with one line saying a peer was lost (the process group's timeout)",
        )
        parser.add_lightning_class_args(ProgressReport, "report")
        parser.add_lightning_class_args(CSVPredictionWriter, "prediction_writer")
        # Model sizes and names follow the data, so any file trains with no model flags; a model
        # rebuilt from a checkpoint keeps the checkpoint's values (see `_parse_ckpt_path`).
        for source, target in LINKS:
            parser.link_arguments(
                f"data.{source}",
                f"model.init_args.{target}",
                compute_fn=functools.partial(self._linked, target),
                apply_on="instantiate",
            )

    def _linked(self, target: str, value: Any) -> Any:
        """The value a data-to-model link gives: the checkpoint's when the model comes from one."""
        saved = getattr(self, "_checkpoint_model", None)
        return saved[1][target] if saved is not None and target in saved[1] else value

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, before a Trainer exists, and
        # merges them into whatever model the arguments name (the default class included): here
        # the checkpoint's own class and hyper-parameters are the model, and an argument that
        # contradicts them is an error. The file is checked first, so that a bad or malicious one
        # is a one-line error, not a traceback.
        self._checkpoint_model = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = checkpoint_file(config, subcommand)
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        if subcommand != "fit":  # fit resumes a checkpoint of any moment, even mid-pass
            _spec(location(path), checkpoint)  # weights that fit their hyper-parameters, a finished pass
        cls, hparams = saved_model(path, checkpoint)
        variant = cls.__name__
        given = given_keys(self._args, subcommand)
        data = {key: hparams[key] for key in ("feature_names", "target_names") if key in hparams}
        encoding = (checkpoint.get("cropyield") or {}).get("encoding")
        if isinstance(encoding, dict) and isinstance(encoding.get("columns"), list):
            data["feature_names"] = encoding["columns"]  # categorical: the data reads the raw columns
            data["levels"] = encoding.get("levels")  # and encodes them with the checkpoint's levels
        check_agreement(path, config, given, variant, hparams, data)
        if subcommand == "fit" and "standardize" in hparams:
            data["standardize"] = hparams["standardize"]  # a resumed fit recomputes the same scaler
        model = {"class_path": f"{cls.__module__}.{variant}", "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model, "data": data}}, self.config)
        self._checkpoint_model = (path, hparams)

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _user_error(err)
            saved = getattr(self, "_checkpoint_model", None)
            if cause is None or saved is None:
                raise
            path, hparams = saved
            raise CropYieldError(
                f"{cause}; the model in {path} takes features {hparams.get('feature_names')} and targets "
                f"{hparams.get('target_names')}"
            ) from None

    @override
    def instantiate_trainer(self, **kwargs):
        if self.subcommand in ("fit", "validate", "test") and isinstance(self.datamodule, CropYieldDataModule):
            self.datamodule.check_targets()  # before the Trainer makes a log folder
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        root = root.rstrip("/") if is_url(root) else os.path.realpath(root)  # a URL: checkpoints and logs there
        if config.get("logger") in (None, True):
            kwargs["logger"] = _default_loggers(root)
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if config.get("strategy") == "ddp":  # Lightning's default would wait 30 minutes for a lost peer
            from lightning.pytorch.strategies import DDPStrategy

            subcommand = self.config.get("subcommand")
            seconds = self.config[subcommand].get("ddp_timeout", DEFAULT_DDP_TIMEOUT) if subcommand else None
            kwargs["strategy"] = DDPStrategy(timeout=timedelta(seconds=seconds or DEFAULT_DDP_TIMEOUT))
        kwargs["callbacks"] = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False:
            kwargs["callbacks"].append(LongWorkProgressBar())
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
            if isinstance(err, CropYieldError):
                raise
            # Lightning checks its arguments here (`max_epochs` must be ..., devices, strategy):
            # the user's mistake, named as the flag that set it.
            message = " ".join(str(err).split())
            keys = list(dict(config))
            named = [k for k in keys if re.search(rf"`{re.escape(k)}`|\b{re.escape(k)}=", message)]
            named = named or [k for k in keys if re.search(rf"\b{re.escape(k)}\b", message)]
            raise CropYieldError(
                (f"--trainer.{named[0]}: " if named else "invalid Trainer arguments: ") + message
            ) from None
        if self.config.get("subcommand") == "fit":
            _warn_if_restarts_share_a_store()
        # Set before fit starts: `fit(ckpt_path="last")` looks only in the dirpath known by then.
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(root, "checkpoints")
        # A fresh fit replaces last.ckpt and same-named best checkpoints: an earlier run's are kept
        # (moved aside before this run's first write, so a run that fails first changes nothing).
        # A resumed fit writes beside its own checkpoints.
        if self.subcommand == "fit":
            resuming = bool(self.config.fit.get("ckpt_path"))
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, CropYieldCheckpoint):
                    callback.keep_earlier, callback.resuming = not resuming, resuming
        return trainer


def _warn_if_restarts_share_a_store() -> None:
    """Under ``torchrun --max-restarts N`` whose agent shares its store with the workers (always with
    the static rendezvous of ``--master-port``, by default with ``--rdzv-backend c10d``), every attempt
    uses the same store with the same keys: a restarted group reads the failed group's addresses
    there and its process group dials dead processes (measured: gloo's "Connection refused", or a
    hang). Said once, by rank 0 of the first attempt, before anything is trained."""
    env = os.environ
    if env.get("RANK", "0") != "0" or env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"):
        warnings.warn(
            "torchrun --max-restarts keeps one store for every attempt, so a restarted group would read the "
            "failed one's addresses and fail to connect; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "torchrun --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... (docs/cluster.md)",
            CropYieldWarning,
            stacklevel=2,
        )


def _default_loggers(root: str) -> list:
    """CSV always (the report reads it); TensorBoard too when it is installed."""
    loggers = [CSVLogger(root, name="lightning_logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(root, name="tensorboard"))
    return loggers


def cli_main(args: list[str] | None = None, run: bool = True) -> CropYieldCLI:
    """Builds (and with ``run=True`` runs) the CLI; ``args`` replaces ``sys.argv[1:]`` in tests.

    ``--config NAME`` also finds the configs shipped in ``cropyield/configs/`` (``tutorial.yaml``,
    ``from_scratch.yaml``, ``fast.yaml``, ``exact.yaml``).
    """
    if args is None:  # the console script: LightningCLI reads sys.argv itself
        sys.argv[1:] = preprocess(sys.argv[1:])
    else:
        args = preprocess(args)
    return CropYieldCLI(
        BaseRegressor,
        CropYieldDataModule,
        subclass_mode_model=True,
        seed_everything_default=DEFAULT_SEED,
        trainer_defaults={"max_epochs": 100, "enable_progress_bar": True},  # a bar for long work only
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "default_env": False,
            "description": "Train and use the crop-yield regressor.",
            # Parse errors are raised, and printed by main() in one line, not after the whole usage.
            "exit_on_error": False,
            **{name: {"exit_on_error": False} for name in SUBCOMMANDS},
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Entry point of ``cropyield``: a user's mistake is one line on stderr and exit code 2."""
    # Lightning's progress information goes to stdout, so that stderr holds only what went wrong.
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)
    one_line_warnings("cropyield")
    try:
        cli_main()
    except SystemExit:  # Lightning's SIGTERMException, or its exit(1) after a KeyboardInterrupt
        stopped = interruption()
        if not stopped:
            raise
        name = signal.Signals(stopped["signum"]).name
        saved = f"saved {stopped['path']} at step {stopped['step']}" if stopped["path"] else "nothing to save yet"
        if not stopped.get("rank"):  # one line for the run, from rank 0 under DDP
            print(f"cropyield: stopped by {name}: {saved}; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + stopped["signum"])
    except argparse.ArgumentError as err:  # jsonargparse's, for a value of the wrong type or an unknown flag
        _fail(one_line(str(err)))
    except Exception as err:
        cause = _user_error(err) or _mismatch(err)
        if cause is None and _peer_lost(err):
            detail = " ".join(str(err).split())[:160]
            print(
                f"cropyield: error: a peer process was lost or stopped answering ({type(err).__name__}: {detail}); "
                "relaunch every node with --ckpt_path last",
                file=sys.stderr,
            )
            sys.exit(1)
        if cause is None:
            raise
        _fail(str(cause))


def _fail(message: str) -> None:
    print(f"cropyield: error: {message}", file=sys.stderr)
    sys.exit(2)


def _mismatch(err: BaseException) -> str | None:
    """Lightning's many-line size-mismatch error on loading weights, in one line."""
    text = str(err)
    if not isinstance(err, RuntimeError) or "Error(s) in loading state_dict" not in text:
        return None
    details = [" ".join(line.split()) for line in text.splitlines() if "size mismatch" in line or "Missing key" in line]
    return "the checkpoint's weights do not fit the model of this run: " + "; ".join(
        details or [text.split("\n", maxsplit=1)[0]]
    )


def _peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure to reach a peer (under DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(err, (dist.DistError, RuntimeError)) and bool(_PEER_LOST.search(str(err)))


def _user_error(err: BaseException | None) -> CropYieldError | None:
    """The CropYieldError behind ``err``: jsonargparse wraps errors raised while it builds the model."""
    while err is not None and not isinstance(err, CropYieldError):
        err = err.__cause__ or err.__context__
    return err
