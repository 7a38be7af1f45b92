"""What the ``cropyield`` command's arguments mean beyond their types: shipped configs found by
name, bare column names taken as one-item lists, parse errors in one line, and the agreement of
the arguments given with the model a ``--ckpt_path`` checkpoint holds."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

import yaml

from cropyield.errors import CropYieldError
from cropyield.storage import is_url

CONFIG_DIR = Path(__file__).parent / "configs"
# Data arguments that hold a list of column names.
_NAME_LISTS = ("--data.feature_names", "--data.target_names")


# (data module attribute, model argument): what the model takes from the data it is trained on.
LINKS = (
    ("model_num_features", "in_features"),
    ("num_targets", "out_features"),
    ("model_feature_names", "feature_names"),
    ("target_names", "target_names"),
    ("standardize", "standardize"),
)
# Model arguments whose values the data module's arguments of the same name give.
_FROM_DATA = ("feature_names", "target_names", "standardize")


def checkpoint_file(config, subcommand: str) -> str | None:
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
            return last if _is_file(last) else None
        if ckpt_path == "hpc":
            names = _names_in(root)
            versions = [int(m[1]) for f in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", f))]
            return os.path.join(root, f"hpc_ckpt_{max(versions)}.ckpt") if versions else None
        return None  # "best" is the best of the fit just run, within one process
    return ckpt_path


def _is_file(path: str) -> bool:
    """Whether a checkpoint file exists, locally or at a URL (``s3://...``, through fsspec)."""
    if not is_url(path):
        return os.path.isfile(path)
    import fsspec

    fs, key = fsspec.core.url_to_fs(path)
    return fs.isfile(key)


def _names_in(folder: str) -> list[str]:
    """The names of the entries of a folder, local or at a URL; none when it does not exist."""
    if not is_url(folder):
        return os.listdir(folder) if os.path.isdir(folder) else []
    import fsspec

    fs, key = fsspec.core.url_to_fs(folder)
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(key, detail=False)] if fs.isdir(key) else []


def saved_model(path: str, checkpoint: dict) -> tuple[type, dict]:
    """The checkpoint's model class and the arguments of that class it was built with."""
    import cropyield
    from cropyield import model as models

    meta = checkpoint.get("cropyield") if isinstance(checkpoint.get("cropyield"), dict) else {}
    variant = meta.get("class", "CropYieldRegressor")
    cls = getattr(cropyield, str(variant), None) if str(variant) in cropyield.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, models.BaseRegressor)) or cls is models.BaseRegressor:
        raise CropYieldError(f"{path}: unknown model class {variant!r}")
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict):
        raise CropYieldError(f"{path}: not a cropyield checkpoint (no hyper_parameters)")
    accepted = inspect.signature(cls).parameters
    hparams = {k: v for k, v in saved.items() if k in accepted}
    weight = (checkpoint.get("state_dict") or {}).get("linear.weight")
    expected = (hparams.get("out_features", 2), hparams.get("in_features", 3))
    if getattr(weight, "shape", None) is not None and tuple(weight.shape) != expected:
        raise CropYieldError(
            f"{path}: linear.weight has shape {tuple(weight.shape)}, but its hyper-parameters say {expected}"
        )
    return cls, hparams


def given_keys(args: list[str], subcommand: str) -> set[str]:
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


def check_agreement(path: str, config, given: set[str], variant: str, hparams: dict, data: dict | None = None) -> None:
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


def shipped_config(name: str) -> str:
    """Resolves ``--config tutorial.yaml`` to the shipped config when no such file is here."""
    if not os.path.exists(name) and (CONFIG_DIR / name).is_file():
        return str(CONFIG_DIR / name)
    return name


def preprocess(args: list[str]) -> list[str]:
    """Shipped configs found by name; ``--data.target_names apples`` read as ``[apples]``."""
    args = list(args)
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("-c", "--config"):
            args[i] = shipped_config(arg)
        elif arg.startswith("--config="):
            args[i] = "--config=" + shipped_config(arg.split("=", 1)[1])
        elif i and args[i - 1] in _NAME_LISTS:
            args[i] = _as_list(arg)
        elif arg.startswith(tuple(f"{name}=" for name in _NAME_LISTS)):
            name, value = arg.split("=", 1)
            args[i] = f"{name}={_as_list(value)}"
    return args


def _as_list(value: str) -> str:
    """``apples`` or ``apples,oranges`` as the YAML list jsonargparse expects; other forms as given."""
    stripped = value.strip()
    if not stripped or stripped[0] in "[{" or stripped in ("null", "None", "~"):
        return value
    return "[" + stripped + "]"


def one_line(message: str) -> str:
    """A jsonargparse error (often several indented lines) as one line naming the argument."""
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not match:
        return " ".join(message.split())
    key, body = match.groups()
    value = re.search(r"(?:Given|Got) value: (.*)", body)
    expected = []
    for what in re.findall(r"Expected an? (.+?)(?:\. Got value:.*)?$", body, re.M):
        what = _EXPECTED.get(re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", what).split(":")[0].strip())
        if what and what not in expected:
            expected.append(what)
    if value is None:
        return f"--{key}: " + " ".join(body.split())
    shown = f"--{key}: invalid value {value[1].strip()!r}"
    return shown + (f" (expected {' or '.join(expected)})" if expected else "")


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "Sequence": "a list such as [a, b]",
    "list": "a list such as [a, b]",
    "str": "a string",
    "dot import path string": "a class name such as ManualSGDRegressor",
}
