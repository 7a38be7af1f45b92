"""Safe checkpoint loading and prediction (the ``cropyield-predict`` command is in :mod:`cropyield.predict_cli`).

Imports only torch, numpy and the standard library (Lightning is imported only by
:func:`load_regressor`), so the command starts about as fast as ``import torch``.

A checkpoint is untrusted input: it is checked against its zip CRCs, then loaded with
``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor or a
plain value; nothing in it is ever executed.
"""

from __future__ import annotations

import inspect
import io
import itertools
import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cropyield import storage
from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError

_VARIANTS = ("CropYieldRegressor", "ManualSGDRegressor", "LeastSquaresRegressor")
_HPARAMS = ("in_features", "out_features", "lr", "l2", "feature_names", "target_names", "standardize", "units")
_HPARAMS += ("fit_intercept", "cov_type")
# Checkpoints written before units were recorded: the tutorial's unit when the names are its own.
_TUTORIAL_NAMES = (["temp", "rainfall", "humidity"], ["apples", "oranges"])
_TUTORIAL_UNITS = "tons per hectare"


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Loads a checkpoint file safely: integrity-checked, tensors and plain values only.

    ``path`` may be a URL (``s3://bucket/run/checkpoints/last.ckpt``): the object is read into
    memory through fsspec and checked the same way.

    Raises:
        CropYieldError: the file is missing, a directory, truncated or corrupted (a CRC mismatch),
            or holds pickled objects other than tensors and plain values.
    """
    path = storage.location(path)
    source = io.BytesIO(fetch(path)) if storage.is_url(path) else path
    if not storage.is_url(path) and not path.exists():
        raise CropYieldError(f"{path}: no such checkpoint file")
    if not storage.is_url(path) and path.is_dir():
        raise CropYieldError(f"{path}: is a directory, not a checkpoint file")
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except Exception as err:  # untrusted bytes: any failure to parse means "not a valid checkpoint"
        raise CropYieldError(f"{path}: not a PyTorch checkpoint, or truncated ({_brief(err)})") from None
    if bad is not None:
        raise CropYieldError(f"{path}: corrupted checkpoint (CRC mismatch in {bad!r}); use another copy")
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        what = str(err).split("\n")
        detail = next((line.strip() for line in what if "Unsupported" in line or "global" in line), what[0])
        raise CropYieldError(
            f"{path}: refused, it holds pickled objects that are not tensors or plain values ({detail[:160]}); "
            "cropyield never runs code from a checkpoint"
        ) from None
    except Exception as err:  # untrusted bytes, as above
        raise CropYieldError(f"{path}: unreadable checkpoint ({_brief(err)})") from None
    if not isinstance(checkpoint, dict):
        raise CropYieldError(f"{path}: not a cropyield checkpoint (no state_dict)")
    return checkpoint


def _brief(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def fetch(url: str) -> bytes:
    """The bytes of a checkpoint object at a URL, through fsspec (s3fs for ``s3://``, the ``cloud`` extra).

    Raises:
        CropYieldError: no filesystem library for the URL, no such object, a folder, or unreadable.
    """
    import fsspec  # a dependency of Lightning, imported only for URLs

    try:
        fs, key = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise CropYieldError(
            f"{url}: no filesystem library for this URL ({_brief(err)}); "
            "install it with: pip install 'cropyield[cloud]'"
        ) from None
    try:
        if fs.isdir(key):
            raise CropYieldError(f"{url}: is a directory, not a checkpoint file")
        return fs.cat_file(key)
    except FileNotFoundError:
        raise CropYieldError(f"{url}: no such checkpoint file") from None
    except OSError as err:
        raise CropYieldError(f"{url}: cannot be read ({_brief(err)})") from None


def _spec(path: Path, checkpoint: dict) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Validates a loaded checkpoint: returns the class name, constructor arguments and weights."""
    state = checkpoint.get("state_dict")
    hparams = checkpoint.get("hyper_parameters")
    if (
        not isinstance(state, dict)
        or not isinstance(hparams, dict)
        or not {"linear.weight", "linear.bias"} <= set(state)
    ):
        raise CropYieldError(f"{path}: not a cropyield checkpoint (no linear.weight and linear.bias in a state_dict)")
    meta = checkpoint.get("cropyield") if isinstance(checkpoint.get("cropyield"), dict) else {}
    variant = meta.get("class", "CropYieldRegressor")
    if variant not in _VARIANTS:
        raise CropYieldError(f"{path}: unknown model class {variant!r} (expected one of {list(_VARIANTS)})")
    partial = meta.get("partial_pass")
    if isinstance(partial, dict) and isinstance(partial.get("count"), torch.Tensor) and partial["count"].sum() > 0:
        raise CropYieldError(
            f"{path}: saved in the middle of an exact least-squares pass ({int(partial['count'].sum())} rows read), "
            "so its weights are not a solution; resume it with --ckpt_path or use the checkpoint of the pass's end"
        )
    kwargs = {k: hparams[k] for k in _HPARAMS if k in hparams}
    weight, bias = state["linear.weight"], state["linear.bias"]
    expected = (kwargs.get("out_features", 2), kwargs.get("in_features", 3))
    if (
        not isinstance(weight, torch.Tensor)
        or not isinstance(bias, torch.Tensor)
        or tuple(weight.shape) != expected
        or tuple(bias.shape) != expected[:1]
    ):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise CropYieldError(f"{path}: linear.weight has shape {got}, but its hyper-parameters say {expected}")
    for name, size in (("feature_mean", expected[1]), ("feature_std", expected[1])):
        if name in state and (not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != (size,)):
            raise CropYieldError(f"{path}: {name} does not hold {size} values, one per feature")
    for key, size in (("feature_names", expected[1]), ("target_names", expected[0])):
        names = kwargs.get(key)
        if names is not None and (
            not isinstance(names, (list, tuple)) or len(names) != size or not all(isinstance(n, str) for n in names)
        ):
            raise CropYieldError(f"{path}: {key} must be {size} names, got {names!r:.80}")
    if kwargs.get("units") is not None and not isinstance(kwargs["units"], str):
        raise CropYieldError(f"{path}: units must be a string or None, got {kwargs['units']!r:.80}")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CropYieldError(f"{path}: {name} holds NaN or infinite values; the run that wrote it diverged")
    if meta.get("encoding") is not None:  # categorical columns: the raw columns and every level
        encoding = Encoding.from_dict(meta["encoding"], f"{path}: encoding")
        if kwargs.get("feature_names") is not None and list(encoding.feature_names) != list(kwargs["feature_names"]):
            raise CropYieldError(f"{path}: its encoding's columns are not its feature_names")
        kwargs["encoding"] = encoding.to_dict()
    return variant, kwargs, state


def load_regressor(path: str | os.PathLike, map_location: str | torch.device | None = "cpu"):
    """Loads a cropyield checkpoint of any variant and returns the model in eval mode.

    Works for checkpoints written by the ``cropyield`` command, the scripts, or plain Trainer code.

    Raises:
        CropYieldError: the file is missing, not a valid checkpoint, of an inconsistent shape, or
            holds pickled objects.
    """
    import cropyield  # Lightning is needed only here

    path = storage.location(path)
    checkpoint = read_checkpoint(path, map_location)
    variant, kwargs, state = _spec(path, checkpoint)
    cls = getattr(cropyield, variant)
    accepted = inspect.signature(cls).parameters
    regressor = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    try:
        regressor.load_state_dict(state)
    except RuntimeError as err:
        raise CropYieldError(f"{path}: weights do not fit the model ({' '.join(str(err).split())[:200]})") from None
    regressor.encoding = kwargs.get("encoding")
    if hasattr(regressor, "load_fit_state"):  # the exact solver's statistics
        regressor.load_fit_state(_exact_state(checkpoint))
    return regressor.eval()


def _exact_state(checkpoint: dict) -> dict | None:
    meta = checkpoint.get("cropyield")
    exact = meta.get("exact") if isinstance(meta, dict) else None
    return exact if isinstance(exact, dict) else None


class LinearPredictor(nn.Module):
    """A checkpoint's weights with the same forward arithmetic as the regressor, without Lightning."""

    def __init__(self, state: dict[str, torch.Tensor], hparams: dict, exact: dict | None = None) -> None:
        super().__init__()
        self.exact = exact  # an exact fit's statistics (intervals), or None
        self.feature_names = list(
            hparams.get("feature_names") or [f"feature_{i}" for i in range(hparams["in_features"])]
        )
        self.target_names = list(hparams.get("target_names") or [f"target_{i}" for i in range(hparams["out_features"])])
        self.standardize = bool(hparams.get("standardize", False))
        self.encoding = hparams.get("encoding")  # raw columns and categorical levels, or None
        self.input_names = list(self.encoding["columns"]) if self.encoding else self.feature_names
        self.units = hparams["units"] if "units" in hparams else legacy_units(self.feature_names, self.target_names)
        self.register_buffer("weight", state["linear.weight"])
        self.register_buffer("bias", state["linear.bias"])
        self.register_buffer("feature_mean", state.get("feature_mean", torch.zeros(self.weight.shape[1])))
        self.register_buffer("feature_std", state.get("feature_std", torch.ones(self.weight.shape[1])))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
    ) -> LinearPredictor:
        path = storage.location(path)
        checkpoint = read_checkpoint(path, map_location)
        _, kwargs, state = _spec(path, checkpoint)
        kwargs.setdefault("in_features", state["linear.weight"].shape[1])
        kwargs.setdefault("out_features", state["linear.weight"].shape[0])
        return cls(state, kwargs, _exact_state(checkpoint)).eval()

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            x = (x - self.feature_mean) / self.feature_std
        return F.linear(x, self.weight, self.bias)


def legacy_units(feature_names: Sequence[str], target_names: Sequence[str]) -> str | None:
    """The unit of a checkpoint that records none (written before units were recorded): the
    tutorial's "tons per hectare" when its names are the tutorial's, else None (unknown)."""
    return _TUTORIAL_UNITS if [list(feature_names), list(target_names)] == list(_TUTORIAL_NAMES) else None


def _names(model: nn.Module, kind: str) -> list[str]:
    names = getattr(model, f"{kind}_names", None) or (getattr(model, "hparams", None) or {}).get(f"{kind}_names")
    return list(names) if names else []


def encode_inputs(model: nn.Module, rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's input tensor for raw rows: lists of values in the input columns' order, or dicts
    keyed by column name; categorical values (strings) are encoded as training did.

    Raises:
        CropYieldError: a row of the wrong length or keys, a missing cell, a value that is not a
            number in a numeric column, or a level the training data did not have (naming the
            row, the column and the value).
    """
    spec = getattr(model, "encoding", None)
    encoding = Encoding.from_dict(spec) if spec else Encoding(tuple(_names(model, "feature")))
    return torch.from_numpy(encoding.encode_rows(rows, dtype=np.float64 if dtype == torch.float64 else np.float32))


def _inputs(model: nn.Module, rows, dtype: torch.dtype) -> torch.Tensor:
    """The model's input tensor for ``rows``: raw rows encoded as training did, numbers as they are."""
    try:
        if _raw_rows(model, rows):
            return encode_inputs(model, rows, dtype)
        return torch.as_tensor(rows, dtype=dtype)
    except (ValueError, TypeError, RuntimeError) as err:
        if isinstance(err, CropYieldError):
            raise
        raise CropYieldError(
            f"rows must be numbers in rows of equal length ({' '.join(str(err).split())[:120]})"
        ) from None


def _raw_rows(model: nn.Module, rows) -> bool:
    """Whether rows need :func:`encode_inputs`: lists or dicts for a model with categorical columns,
    or dicts. A tensor or array holds the model's features already (encoded, as a data module serves them)."""
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        return False
    if getattr(model, "encoding", None):
        return True
    first = rows[0] if isinstance(rows, (list, tuple)) and rows else rows
    return isinstance(rows, dict) or isinstance(first, dict)


def predict(model: nn.Module, rows, interval: float | None = None, kind: str = "prediction"):
    """Predicts yields for rows of inputs: a list of lists, a list of dicts keyed by column name,
    a numpy array or a tensor. A model with categorical columns takes the raw columns as lists or
    dicts, strings included (``[["Potatoes", 1485.0, 121.0, 16.4]]``), and encodes them as training
    did; a tensor or array holds its encoded features (the data module's rows).

    Args:
        model: a regressor (``load_regressor``) or a :class:`LinearPredictor`.
        rows: the inputs, one row per region, in the model's feature order (raw columns, or dicts
            keyed by column, for a model with categorical columns).
        interval: a level such as 0.95: also return the interval of each prediction, as
            statsmodels' ``get_prediction(...).summary_frame(alpha=1 - interval)`` (exact fits only).
        kind: ``"prediction"``: where a new observation falls (``obs_ci_*``); ``"mean"``: the
            confidence interval of the expected value (``mean_ci_*``).

    Returns:
        A float32 CPU tensor ``[rows, targets]``, one column per target; with ``interval``, a
        :class:`~cropyield.summary.Prediction` with float64 ``.mean``, ``.lower``, ``.upper``.

    Raises:
        CropYieldError: the rows are ragged, have the wrong number of values, or hold non-numeric
            or non-finite values, a missing cell or an unseen level; with ``interval``, no exact
            least-squares fit backs the model.
    """
    if interval is not None:
        return _with_interval(model, rows, interval, kind)
    x = _inputs(model, rows, torch.float32)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    features = _names(model, "feature")
    expected = len(features) or x.shape[-1]
    if x.ndim != 2 or x.shape[1] != expected:
        named = f" ({', '.join(features)})" if features else ""
        raise CropYieldError(f"expected {expected} values per row{named}, got rows of shape {tuple(x.shape)}")
    # A finite sum is the cheap common case; only a non-finite one needs the element-wise look, as
    # large finite values can overflow a float32 sum. A request's few values are summed in Python:
    # a torch reduction costs as much as the prediction itself.
    total = sum(itertools.chain.from_iterable(x.tolist())) if x.numel() <= 64 else x.sum().item()
    if not math.isfinite(total) and not torch.isfinite(x).all():
        raise CropYieldError("inputs must be finite numbers (found NaN or infinity)")
    device = getattr(model, "device", None) or next(itertools.chain(model.parameters(), model.buffers())).device
    if model.training:
        model.eval()
    with torch.inference_mode():  # the conversions are skipped where they would do nothing
        preds = model(x if x.device == device else x.to(device))
    preds = preds if preds.dtype == torch.float32 else preds.float()
    return preds if preds.device.type == "cpu" else preds.cpu()


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FEW_ROWS = 16


def rows_tensor(rows, feature_names: Sequence[str]) -> torch.Tensor:
    """Validates rows decoded from JSON: lists in feature order, or objects keyed by feature name.

    An object's keys other than the feature names are ignored, as ``cropyield-predict --csv``
    ignores a file's other columns (ids, notes); a missing feature is an error.

    Example:
        >>> rows = [[75, 63, 44], {"humidity": 44, "temp": 75, "rainfall": 63, "id": 7}]
        >>> rows_tensor(rows, ["temp", "rainfall", "humidity"])
        tensor([[75., 63., 44.],
                [75., 63., 44.]])

    Returns:
        A float32 tensor ``[rows, features]``.

    Raises:
        CropYieldError: naming the first bad row and feature (a missing key, a wrong count, a string,
            ``true``/``false``, NaN, infinity or a number beyond float32's range).
    """
    names = list(feature_names)
    if not isinstance(rows, list) or not rows:
        raise CropYieldError('"rows" must be a non-empty list of rows')
    if dict in set(map(type, rows)):
        rows = [_in_order(i, row, names) if type(row) is dict else row for i, row in enumerate(rows)]
    if len(rows) <= _FEW_ROWS and all(type(row) is list and len(row) == len(names) for row in rows):
        # A few rows (most requests): checked value by value in Python, cheaper than torch ops;
        # the comparison is False for NaN, infinity, beyond float32, and true/false are refused.
        values = list(itertools.chain.from_iterable(rows))
        if all(type(v) in (int, float) and -_FLOAT32_MAX <= v <= _FLOAT32_MAX for v in values):
            return torch.tensor(rows, dtype=torch.float32)
    try:
        x = torch.tensor(rows, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        x = None
    # Many rows: one C conversion and a finite sum. torch reads true/false as 1/0 and names no row,
    # so a body with either, or any value the conversion refuses, goes through the loop that finds
    # it (which also clears large finite values whose float32 sum overflowed).
    if (
        x is not None
        and x.shape == (len(rows), len(names))
        and math.isfinite(x.sum().item())
        and bool not in set(map(type, itertools.chain.from_iterable(rows)))
    ):
        return x
    problem = _first_problem(rows, names)
    if problem is not None:
        raise problem
    return x if x is not None else torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)


def _in_order(i: int, row: dict, names: list[str]) -> list:
    missing = [name for name in names if name not in row]
    if missing:
        raise CropYieldError(f"row {i}: missing {missing} (a row holds {names}; other keys are ignored)")
    return [row[name] for name in names]


def _first_problem(rows: list, names: list[str]) -> CropYieldError | None:
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(names):
            return CropYieldError(f"row {i}: expected {len(names)} values ({', '.join(names)}), got {row!r:.60}")
        for name, value in zip(names, row, strict=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return CropYieldError(f"row {i}, {name}: {value!r:.40} is not a number")
            if isinstance(value, float) and not math.isfinite(value):
                return CropYieldError(f"row {i}, {name}: {value} is not a finite number")
            if abs(value) > _FLOAT32_MAX:
                shown = f"{value:.4g}" if abs(value) < 1e308 else f"a {len(str(abs(value)))}-digit number"
                return CropYieldError(f"row {i}, {name}: {shown} is beyond float32's range (3.4e38)")
    return None


def prediction_table(
    model: nn.Module, rows, interval: float | None = None, kind: str = "prediction"
) -> tuple[torch.Tensor, list[str]]:
    """The predictions as columns with their names, as ``cropyield-predict`` and the server give them.

    Without ``interval``: one float32 column per target (``apples, oranges``); with it, float64,
    each target followed by its bounds (``apples, apples_lower, apples_upper, ...``).
    """
    preds = predict(model, rows)
    if interval is None:
        return preds, list(model.target_names)
    bounds = predict(model, rows, interval=interval, kind=kind)
    preds = torch.stack([preds.double(), bounds.lower, bounds.upper], dim=2).reshape(len(preds), -1)
    return preds, [f"{n}{suffix}" for n in model.target_names for suffix in ("", "_lower", "_upper")]


def records(preds: torch.Tensor, target_names: Sequence[str]) -> list[dict[str, float]]:
    """Predictions as JSON-ready objects, one per row: ``[{"apples": ..., "oranges": ...}, ...]``."""
    names = list(target_names)
    return [dict(zip(names, row, strict=True)) for row in preds.tolist()]


def _with_interval(model: nn.Module, rows, level: float, kind: str):
    from cropyield.summary import prediction_intervals

    state = model.exact if isinstance(model, LinearPredictor) else None
    if state is None and callable(getattr(model, "fit_state", None)) and getattr(model, "factor", None) is not None:
        state = model.fit_state()
    if state is None:
        raise CropYieldError(
            "prediction intervals need an exact least-squares fit (LeastSquaresRegressor, l2=0); this model has none"
        )
    x = _inputs(model, rows, torch.float64)
    predict(model, x)  # the same checks of the rows as without an interval
    return prediction_intervals(state, x.reshape(-1, x.shape[-1]) if x.ndim == 1 else x, level, kind)
