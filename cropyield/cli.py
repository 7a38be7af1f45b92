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

import importlib.util
import logging
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from cropyield.callbacks import AtomicCheckpointIO, CropYieldCheckpoint, CSVPredictionWriter, ProgressReport
from cropyield.data import CropYieldDataModule
from cropyield.errors import CropYieldError, one_line_warnings
from cropyield.inference import read_checkpoint
from cropyield.model import BaseRegressor
from cropyield.storage import is_url

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_SEED = 42
DEFAULT_DDP_TIMEOUT = 120.0
# How a collective reports a peer that died or stopped answering (gloo, NCCL, the TCP store).
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out|timed out|NCCL.*(timeout|Watchdog)|"
    r"recvBytes|sendBytes|Socket Timeout",
)


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
        # Model sizes and names follow the data, so any file trains with no model flags.
        for source, target in [
            ("num_features", "in_features"),
            ("num_targets", "out_features"),
            ("feature_names", "feature_names"),
            ("target_names", "target_names"),
            ("standardize", "standardize"),
        ]:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, before a Trainer exists: check
        # the file first, so that a bad or malicious one is a one-line error, not a traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and (Path(ckpt_path).exists() or ckpt_path not in ("last", "best", "hpc")):
            read_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    @override
    def instantiate_trainer(self, **kwargs):
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
        trainer = super().instantiate_trainer(**kwargs)
        # Set before fit starts: `fit(ckpt_path="last")` looks only in the dirpath known by then.
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(root, "checkpoints")
        return trainer


def _default_loggers(root: str) -> list:
    """CSV always (the report reads it); TensorBoard too when it is installed."""
    loggers = [CSVLogger(root, name="lightning_logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(root, name="tensorboard"))
    return loggers


def shipped_config(name: str) -> str:
    """Resolves ``--config tutorial.yaml`` to the shipped config when no such file is here."""
    if not os.path.exists(name) and (CONFIG_DIR / name).is_file():
        return str(CONFIG_DIR / name)
    return name


def _resolve_configs(args: list[str]) -> list[str]:
    args = list(args)
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("-c", "--config"):
            args[i] = shipped_config(arg)
        elif arg.startswith("--config="):
            args[i] = "--config=" + shipped_config(arg.split("=", 1)[1])
    return args


def cli_main(args: list[str] | None = None, run: bool = True) -> CropYieldCLI:
    """Builds (and with ``run=True`` runs) the CLI; ``args`` replaces ``sys.argv[1:]`` in tests.

    ``--config NAME`` also finds the configs shipped in ``cropyield/configs/`` (``tutorial.yaml``,
    ``from_scratch.yaml``, ``fast.yaml``, ``exact.yaml``).
    """
    if args is None:  # the console script: LightningCLI reads sys.argv itself
        sys.argv[1:] = _resolve_configs(sys.argv[1:])
    else:
        args = _resolve_configs(args)
    return CropYieldCLI(
        BaseRegressor,
        CropYieldDataModule,
        subclass_mode_model=True,
        seed_everything_default=DEFAULT_SEED,
        trainer_defaults={"max_epochs": 100, "enable_progress_bar": False},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "description": "Train and use the crop-yield regressor."},
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
    except Exception as err:
        cause = _user_error(err)
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
        print(f"cropyield: error: {cause}", file=sys.stderr)
        sys.exit(2)


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
