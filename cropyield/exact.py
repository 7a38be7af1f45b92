"""The exact least-squares regressor: one Trainer pass into a QR factor, solved at its end, and the
statistics of that fit (:meth:`LeastSquaresRegressor.summary`, prediction intervals).

The linear algebra lives in :mod:`cropyield.reference` (the factor) and :mod:`cropyield.solution`
(the solve, leverages); the statistics' formulas in :mod:`cropyield.summary`; this module keeps
the state and drives the passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric
from typing_extensions import override

from cropyield.errors import CropYieldError, CropYieldWarning
from cropyield.model import BaseRegressor
from cropyield.reference import ONE_INTRA_OP_THREAD, QRFactor
from cropyield.solution import LeastSquares, float32_fit, solve, whitened

COV_TYPES = ("nonrobust", "HC0", "HC1", "HC2", "HC3")
_FACTOR_FIELDS = ("count", "shift", "scale", "r", "low", "high")


class LeastSquaresStatistics(Metric):
    """The float64 :class:`~cropyield.reference.QRFactor` of the ``[inputs | 1 | targets]`` rows seen.

    A torchmetrics ``Metric`` so that torchmetrics gathers the per-process states under DDP;
    :meth:`compute` then merges them in rank order, as ``PearsonCorrCoef`` merges its co-moments.
    The maths lives in :mod:`cropyield.reference`; this class only keeps the state.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_features: int, num_targets: int, center: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features, self.center = num_features, center
        empty = QRFactor.empty(num_features, num_targets)
        for name in _FACTOR_FIELDS:
            self.add_state(name, getattr(empty, name), dist_reduce_fx=None)

    def update(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        factor = self.factor().update(inputs, targets, center=self.center)
        for name in _FACTOR_FIELDS:
            setattr(self, name, getattr(factor, name))

    def factor(self) -> QRFactor:
        """This process's factor (the states as they are, not gathered)."""
        return QRFactor(self.num_features, *(getattr(self, name) for name in _FACTOR_FIELDS))

    def compute(self) -> QRFactor:
        if self.count.ndim == 0:  # one process
            return self.factor()
        # Gathered from every process: stacked in rank order.
        states = zip(*(getattr(self, name) for name in _FACTOR_FIELDS), strict=True)
        return reduce(QRFactor.merge, (QRFactor(self.num_features, *state) for state in states))


class _CountBatches(torch.optim.Optimizer):
    """An optimizer whose step changes nothing: it lets Lightning count the batches of an exact
    pass as steps, so ``global_step``, ``max_steps`` and step checkpoints keep their meaning."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        return closure() if closure is not None else None


class LeastSquaresRegressor(BaseRegressor):
    """The exact least-squares (or ridge) fit, in one pass of the Lightning Trainer: no SGD.

    Every ``training_step`` adds its batch, in float64, to the QR factor of the rows (see
    :class:`~cropyield.reference.QRFactor`); after the epoch's last batch the factors are merged
    (across processes under DDP) and solved, and ``self.linear`` holds the solution (``solution``
    the float64 one). Another epoch recomputes the same answer, so ``max_epochs: 1`` is all it
    needs. The data module serves every training row exactly once to this model, under DDP too,
    and in float64 from files. Singular data (a constant or duplicated column, fewer rows than
    features) gets the minimum-norm solution and a warning naming the columns at fault.

    Args:
        in_features: number of input columns (None: the data module's, when the model is set up).
        out_features: number of targets.
        l2: ridge penalty, as scikit-learn's ``Ridge(alpha=l2)``: minimizes
            ``‖Y - X Wᵀ - b‖² + l2 ‖W‖²``, the intercept not penalized. 0 is ordinary least squares.
        feature_names: names of the inputs, recorded in checkpoints.
        target_names: names of the targets, used in metric names and predictions.
        standardize: fit on standardized inputs (the data module's feature statistics, stored in the
            checkpoint); with ``l2 > 0`` the penalty then applies to the standardized weights.
        fit_intercept: fit a bias; False fits through the origin (R² is then uncentred, as
            statsmodels reports it without a constant).
        cov_type: the coefficients' covariance in :meth:`summary` and the intervals: ``nonrobust``,
            or ``HC0``-``HC3`` (heteroscedasticity-robust, as statsmodels' ``fit(cov_type=...)``),
            which take one more pass over the training rows within the same ``fit``.
        units: the unit of the targets' values (as for :class:`~cropyield.model.CropYieldRegressor`).
    """

    def __init__(
        self,
        in_features: int | None = 3,
        out_features: int = 2,
        l2: float = 0.0,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        standardize: bool = False,
        fit_intercept: bool = True,
        cov_type: str = "nonrobust",
        units: str | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            feature_names,
            target_names,
            standardize,
            units,
            l2=float(l2),
            fit_intercept=bool(fit_intercept),
            cov_type=str(cov_type),
        )
        if not l2 >= 0:
            raise CropYieldError(f"l2 must be zero or positive, got {l2}")
        if cov_type not in COV_TYPES:
            raise CropYieldError(f"cov_type must be one of {list(COV_TYPES)}, got {cov_type!r}")
        if cov_type != "nonrobust" and l2 > 0:
            raise CropYieldError(f"cov_type={cov_type!r} needs ordinary least squares (l2=0), not ridge (l2={l2:g})")
        self.automatic_optimization = False
        self.statistics = self._empty_statistics()
        self.solution: LeastSquares | None = None  # the last solve, in float64 (on the scaled inputs with standardize)
        self.factor: QRFactor | None = None  # the factor it solved (of the raw rows)
        self.meat: torch.Tensor | None = None  # HC: Σ wᵢ zᵢzᵢᵀ per target, zᵢ the whitened design row
        self._solved = False

    data_dtype = torch.float64  # asks the data module for float64 rows (every digit of the files)
    exact_pass = True  # tells the data module to serve every training row exactly once
    _resumed_pass = False

    def _empty_statistics(self) -> LeastSquaresStatistics:
        hp = self.hparams  # in_features None: sized in setup (`_size`)
        return LeastSquaresStatistics(hp.in_features or 0, hp.out_features, center=hp.fit_intercept)

    @override
    def _size(self, dm) -> None:
        super()._size(dm)
        self.statistics = self._empty_statistics()

    @override
    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.statistics.update(x, y)
        self.optimizers().step()
        # Solved now rather than at the epoch's end: validation and its checkpoints run before
        # `on_train_epoch_end`, and must see the solution.
        if self.trainer.is_last_batch:
            self._solve()

    @override
    def on_train_epoch_start(self) -> None:
        if not self._resumed_pass:
            self.statistics.reset()
        self._resumed_pass = self._solved = False

    @override
    def on_train_epoch_end(self) -> None:
        if not self._solved:  # the epoch was cut short (max_steps, limit_train_batches)
            self._solve()

    def _solve(self) -> None:
        factor = self.statistics.compute()  # gathered and merged in rank order under DDP
        self.statistics.reset()  # a checkpoint from now on holds no partial pass
        hp = self.hparams
        seen = factor.scaled(self.feature_mean, self.feature_std) if hp.standardize else factor
        fit = solve(seen, hp.l2, hp.feature_names, hp.fit_intercept)
        if fit.problems:
            rank_zero_warn(
                f"the data is singular ({fit.problems}); using the minimum-norm least-squares solution",
                category=CropYieldWarning,
            )
        weight, bias = float32_fit(fit, seen)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.solution, self.factor, self.meat, self._solved = fit, factor.to("cpu"), None, True
        if hp.cov_type != "nonrobust" and not fit.problems:
            self.meat = self._sandwich_pass()
        self.log("train/loss", fit.mse, on_step=False, on_epoch=True)  # the MSE, as the SGD variants log

    def _sandwich_pass(self) -> torch.Tensor:
        """One more pass over this process's training rows: ``Σ wᵢ zᵢzᵢᵀ`` per target, with
        ``zᵢ = R⁻ᵀ x̃ᵢ`` (so ``hᵢ = ‖zᵢ‖²``) and ``wᵢ`` the squared residual, divided by ``1 - hᵢ``
        (HC2) or its square (HC3); summed over the processes."""
        fit = solve(self.factor, fit_intercept=self.hparams.fit_intercept)  # on the raw inputs
        p, kind = self.hparams.in_features, self.hparams.cov_type
        design, coef = fit.design, fit.coef_scaled
        q = len(design)
        meat = torch.zeros(coef.shape[1], q, q, dtype=torch.float64)
        dm = self.trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else self.trainer.train_dataloader
        with ONE_INTRA_OP_THREAD:  # small operations, as the factor's (see OneIntraOpThread)
            for batch in loader:
                x, y = move_data_to_device(batch, "cpu")
                if not len(x):
                    continue
                columns = self.factor.scaled_columns(x, y, origin=not fit.fit_intercept)  # [X̃, 1, Ỹ] by rows
                z = whitened(design, columns[:q].T)  # [q, rows]
                weight = (columns[p + 1 :] - coef.T @ columns[:q]).square_()  # residuals², [targets, rows]
                if kind in ("HC2", "HC3"):
                    weight /= (1 - z.square().sum(0)) ** (1 if kind == "HC2" else 2)  # the leverages
                meat += (z * weight[:, None, :]) @ z.T
        return self.trainer.strategy.reduce(meat.to(self.device), reduce_op="sum").cpu()

    def summary(self, alpha: float = 0.05):
        """The fit's statistics, as statsmodels' ``OLS(...).fit(cov_type=...).summary()`` gives them.

        Returns:
            A :class:`~cropyield.summary.RegressionSummary`: ``str()`` is a table per target,
            ``to_dict()`` the numbers.

        Raises:
            CropYieldError: the model is not fitted, is ridge (``l2 > 0``), or the data is singular.
        """
        from cropyield.summary import RegressionSummary

        if self.factor is None:
            raise CropYieldError("no exact fit to summarize: fit the model first, or load a checkpoint of a fit")
        return RegressionSummary.of(self.fit_state(), alpha)

    def fit_state(self) -> dict:
        """What the statistics need, as plain tensors and values (kept in checkpoints)."""
        hp = self.hparams
        factor = self.factor
        state = {name: getattr(factor, name) for name in _FACTOR_FIELDS}
        fit = self.solution
        state.update(
            num_features=factor.num_features,
            feature_names=list(hp.feature_names),
            target_names=list(hp.target_names),
            l2=float(hp.l2),
            fit_intercept=bool(hp.fit_intercept),
            cov_type=str(hp.cov_type),
            meat=self.meat,
            problems=fit.problems if fit is not None else None,
            weight=fit.weight if fit is not None else None,  # float64, on the inputs the model sees
            bias=fit.bias if fit is not None else None,
            rss=fit.rss if fit is not None else None,
            rank=fit.rank if fit is not None else None,
        )
        return state

    def load_fit_state(self, state: dict | None) -> None:
        """Restores what :meth:`fit_state` saved (:func:`~cropyield.inference.load_regressor` calls it)."""
        if not isinstance(state, dict) or not isinstance(state.get("r"), torch.Tensor):
            return
        self.factor = QRFactor(int(state["num_features"]), *(state[name].double() for name in _FACTOR_FIELDS))
        self.meat = state.get("meat")
        hp = self.hparams
        seen = self.factor.scaled(self.feature_mean, self.feature_std) if hp.standardize else self.factor
        self.solution = solve(seen, hp.l2, hp.feature_names, hp.fit_intercept)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _CountBatches(self.parameters())

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # A checkpoint made in the middle of the pass carries every process's statistics so far,
        # so a resumed run finishes the same pass instead of losing the rows already read.
        state = self.statistics.factor()
        tensors = [getattr(state, name) for name in _FACTOR_FIELDS]
        if self.trainer.world_size > 1:
            tensors = [self.all_gather(t) for t in tensors]
        checkpoint["cropyield"]["partial_pass"] = {
            name: t.cpu() for name, t in zip(_FACTOR_FIELDS, tensors, strict=True)
        }
        if self.factor is not None:
            fitted = self.fit_state()
            checkpoint["cropyield"]["exact"] = {
                k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in fitted.items() if v is not None
            }

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the categorical encoding
        meta = checkpoint.get("cropyield") or {}
        self.load_fit_state(meta.get("exact"))
        partial = meta.get("partial_pass")
        self._resumed_pass = False
        if not partial or self._trainer is None:
            return
        if "r" not in partial:
            raise CropYieldError(
                "this checkpoint holds a partial exact pass of an earlier cropyield (co-moments); start the pass again"
            )
        tensors = [partial[name] for name in _FACTOR_FIELDS]
        if tensors[0].ndim:  # saved under DDP: this process's own share
            if len(tensors[0]) != self.trainer.world_size:
                raise CropYieldError(
                    f"this checkpoint was saved by {len(tensors[0])} processes in the middle of an exact pass; "
                    f"resume it with as many (not {self.trainer.world_size}) or start the pass again"
                )
            rank = self.trainer.global_rank
            tensors = [t[rank] for t in tensors]
        for name, t in zip(_FACTOR_FIELDS, tensors, strict=True):
            setattr(self.statistics, name, t.to(self.device, torch.float64))
        self._resumed_pass = True
