"""The ``cropyield`` console command: LightningCLI over the data module and either model variant.

cropyield fit                                     # the tutorial run: 100 epochs, batch 5, SGD at 1e-5
cropyield fit --config from_scratch.yaml          # the manual-optimization variant (see configs/)
cropyield fit --config exact.yaml                 # the exact least-squares fit in one pass
cropyield fit --ckpt_path last                    # resume from checkpoints/last.ckpt
cropyield predict --ckpt_path checkpoints/last.ckpt
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

from cropyield.callbacks import AtomicCheckpointIO, CropYieldCheckpoint, CSVPredictionWriter, ProgressReport
from cropyield.data import CropYieldDataModule
from cropyield.errors import CropYieldError, one_line_warnings
from cropyield.inference import _spec, read_checkpoint
from cropyield.model import BaseRegressor

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_SEED = 42


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
        parser.add_lightning_class_args(ProgressReport, "report")
        parser.add_lightning_class_args(CSVPredictionWriter, "prediction_writer")
        # Model sizes and names follow the data, so any file trains with no model flags; a model
        # rebuilt from a checkpoint keeps the checkpoint's values (see `_parse_ckpt_path`).
        for source, target in _LINKS:
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
        path = _checkpoint_file(config, subcommand)
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        if subcommand != "fit":  # fit resumes a checkpoint of any moment, even mid-pass
            _spec(Path(path), checkpoint)  # weights that fit their hyper-parameters, a finished pass
        variant, hparams = _saved_model(path, checkpoint)
        given = _given_keys(self._args, subcommand)
        data = {key: hparams[key] for key in ("feature_names", "target_names") if key in hparams}
        encoding = (checkpoint.get("cropyield") or {}).get("encoding")
        if isinstance(encoding, dict) and isinstance(encoding.get("columns"), list):
            data["feature_names"] = encoding["columns"]  # categorical: the data reads the raw columns
            data["levels"] = encoding.get("levels")  # and encodes them with the checkpoint's levels
        _check_agreement(path, config, given, variant, hparams, data)
        if subcommand == "fit" and "standardize" in hparams:
            data["standardize"] = hparams["standardize"]  # a resumed fit recomputes the same scaler
        model = {"class_path": f"cropyield.model.{variant}", "init_args": hparams}
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
        config = self._get(self.config_init, "trainer", default={})
        root = os.path.realpath(config.get("default_root_dir") or os.getcwd())
        if config.get("logger") in (None, True):
            kwargs["logger"] = _default_loggers(root)
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        # Set before fit starts: `fit(ckpt_path="last")` looks only in the dirpath known by then.
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(root, "checkpoints")
        return trainer


# (data module attribute, model argument): what the model takes from the data it is trained on.
_LINKS = (
    ("num_features", "in_features"),
    ("num_targets", "out_features"),
    ("feature_names", "feature_names"),
    ("target_names", "target_names"),
    ("standardize", "standardize"),
)
# Model arguments whose values the data module's arguments of the same name give.
_FROM_DATA = ("feature_names", "target_names", "standardize")


def _checkpoint_file(config, subcommand: str) -> str | None:
    """The checkpoint file ``--ckpt_path`` names (``last`` and ``hpc`` resolved as Lightning will),
    or None when there is none to read."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path in ("last", "hpc", "best") and not Path(ckpt_path).exists():
        root = config.trainer.get("default_root_dir") or os.getcwd()
        if ckpt_path == "last":
            folder = config.get("checkpoint", {}).get("dirpath") or os.path.join(root, "checkpoints")
            last = os.path.join(folder, "last.ckpt")
            return last if os.path.isfile(last) else None
        if ckpt_path == "hpc":
            versions = [int(m[1]) for f in os.listdir(root) if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", f))]
            return os.path.join(root, f"hpc_ckpt_{max(versions)}.ckpt") if versions else None
        return None  # "best" is the best of the fit just run, within one process
    return ckpt_path


def _saved_model(path: str, checkpoint: dict) -> tuple[str, dict]:
    """The checkpoint's model class name and the arguments of that class it was built with."""
    from cropyield import model as models

    meta = checkpoint.get("cropyield") if isinstance(checkpoint.get("cropyield"), dict) else {}
    variant = meta.get("class", "CropYieldRegressor")
    cls = getattr(models, str(variant), None)
    if not (isinstance(cls, type) and issubclass(cls, BaseRegressor)) or cls is BaseRegressor:
        raise CropYieldError(f"{path}: unknown model class {variant!r}")
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict):
        raise CropYieldError(f"{path}: not a cropyield checkpoint (no hyper_parameters)")
    accepted = inspect.signature(cls).parameters
    return variant, {k: v for k, v in saved.items() if k in accepted}


def _given_keys(args: list[str], subcommand: str) -> set[str]:
    """The ``model.*`` and ``data.*`` keys that the command line or its config files set, such as
    ``model.class_path``, ``model.init_args.lr``, ``data.standardize``: values a checkpoint must
    agree with (a key left at its default is the checkpoint's to fill)."""
    keys: set[str] = set()
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            keys |= _config_keys(args[i + 1], subcommand)
        elif arg.startswith("--config="):
            keys |= _config_keys(arg.split("=", 1)[1], subcommand)
        elif arg.startswith("--"):
            keys.add(_normalized(arg[2:].split("=", 1)[0].rstrip("+")))
    return keys


def _config_keys(path: str, subcommand: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()  # the parser has read it already, or reported it
    if isinstance(config, dict) and isinstance(config.get(subcommand), dict):
        config = config[subcommand]
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and prefix.count(".") < 3:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif prefix:
            keys.add(_normalized(prefix))

    walk(config, "")
    return keys


def _normalized(key: str) -> str:
    """``model`` -> ``model.class_path``, ``model.lr`` -> ``model.init_args.lr``."""
    parts = key.split(".")
    if parts[0] != "model":
        return key
    if len(parts) == 1:
        return "model.class_path"
    if parts[1] in ("init_args", "dict_kwargs"):
        return "model.init_args." + ".".join(parts[2:])
    return key if parts[1] == "class_path" else "model.init_args." + ".".join(parts[1:])


def _check_agreement(path: str, config, given: set[str], variant: str, hparams: dict, data: dict | None = None) -> None:
    """Refuses, in one line, arguments that contradict the model a checkpoint holds (``data``: the
    values the data module takes from it, where they are not the model's: raw categorical columns)."""
    problems = []
    if "model.class_path" in given:
        named = str(config.model.class_path).rsplit(".", 1)[-1]
        if named != variant:
            problems.append(f"--model {named}")
    for key in sorted(k for k in given if k.startswith("model.init_args.")):
        name = key.split(".")[2]
        value = config.model.get("init_args", {}).get(name)
        if name not in hparams:
            problems.append(f"--model.{name} (a {variant} has no {name})")
        elif not _same(value, hparams[name]):
            problems.append(f"--model.{name} {_shown(value)} (saved: {_shown(hparams[name])})")
    for name in _FROM_DATA:
        value, saved = config.data.get(name), (data or {}).get(name, hparams.get(name))
        if f"data.{name}" in given and name in hparams and value is not None and not _same(value, saved):
            problems.append(f"--data.{name} {_shown(value)} (saved: {_shown(saved)})")
    if problems:
        raise CropYieldError(
            f"{path}: {'; '.join(problems)}: contradicts the {variant} this checkpoint holds, which is rebuilt "
            "as it was saved (drop the argument, or train a new model without --ckpt_path)"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


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
        if cause is None:
            raise
        print(f"cropyield: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _user_error(err: BaseException | None) -> CropYieldError | None:
    """The CropYieldError behind ``err``: jsonargparse wraps errors raised while it builds the model."""
    while err is not None and not isinstance(err, CropYieldError):
        err = err.__cause__ or err.__context__
    return err
