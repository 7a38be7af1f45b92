"""cropyield: the 'Linear Regression with PyTorch' crop-yield tutorial as a PyTorch Lightning package.

Names are imported on first use, so ``cropyield-predict`` (which needs only torch) starts fast.
"""

import atexit
import gc
from importlib import import_module
from typing import TYPE_CHECKING

# pyarrow's reader threads can still hold objects when the interpreter tears its modules down, and then
# abort the finished process ("terminate called without an active exception", apache/arrow#34314): one
# `cropyield-predict --csv` in four or five here. Collecting at exit, while Arrow is still whole, ends them.
atexit.register(gc.collect)

__all__ = [
    "FEATURE_NAMES",
    "INPUTS",
    "TARGETS",
    "TARGET_NAMES",
    "CropYieldDataModule",
    "CropYieldError",
    "CropYieldRegressor",
    "LeastSquaresRegressor",
    "ManualSGDRegressor",
    "load_regressor",
    "predict",
]

_WHERE = {
    "FEATURE_NAMES": "data",
    "INPUTS": "data",
    "TARGETS": "data",
    "TARGET_NAMES": "data",
    "CropYieldDataModule": "data",
    "CropYieldError": "errors",
    "CropYieldRegressor": "model",
    "LeastSquaresRegressor": "exact",
    "ManualSGDRegressor": "model",
    "load_regressor": "inference",
    "predict": "inference",
}

if TYPE_CHECKING:
    from cropyield.data import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS, CropYieldDataModule
    from cropyield.errors import CropYieldError
    from cropyield.exact import LeastSquaresRegressor
    from cropyield.inference import load_regressor, predict
    from cropyield.model import CropYieldRegressor, ManualSGDRegressor


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"cropyield.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'cropyield' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
