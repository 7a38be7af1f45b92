"""The statistics of an exact least-squares fit, as statsmodels' ``OLS`` defines them, and
prediction intervals, from the few pieces a fit keeps (its QR factor, the robust covariance's
middle, the settings): :class:`RegressionSummary` and :func:`prediction_intervals`.

Every number is computed as ``statsmodels.regression.linear_model.RegressionResults`` computes
it: ``sigma = √(RSS / df_resid)``; R² centred with an intercept, uncentred without; the F-test of
all coefficients but the intercept (a Wald test with the robust covariance for ``HC0``-``HC3``);
Student's t for ``nonrobust`` and the normal distribution for ``HC0``-``HC3`` (statsmodels'
``use_t`` defaults); the log-likelihood, AIC and BIC of the Gaussian model; the condition number
as the ratio of the design's largest to smallest singular value (the intercept column included).
The covariances come from the factor, never from ``XᵀX``: ``(XᵀX)⁻¹ = G R⁻¹ R⁻ᵀ Gᵀ``. p-values
and quantiles are scipy's (the ``stats`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cropyield.errors import CropYieldError
from cropyield.reference import QRFactor
from cropyield.solution import scaled_design, solve, to_original, whitened

_FIELDS = ("count", "shift", "scale", "r", "low", "high")
_LARGE_CONDITION = 1000.0  # statsmodels' threshold for its multicollinearity note


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise CropYieldError(
            "p-values and intervals need scipy; install it with: pip install 'cropyield[stats]'"
        ) from None
    return stats


@dataclass(frozen=True)
class _Pieces:
    """The fit's pieces on the raw inputs: factor, solution, covariance maps, degrees of freedom."""

    factor: QRFactor
    fit: object  # solution.LeastSquares
    fit_intercept: bool
    cov_type: str
    meat: torch.Tensor | None
    nobs: int
    df_model: int
    df_resid: int

    @staticmethod
    def of(state: dict) -> _Pieces:
        if not isinstance(state, dict) or not isinstance(state.get("r"), torch.Tensor):
            raise CropYieldError("no exact least-squares fit backs this model (an SGD model has no such statistics)")
        if state.get("l2", 0.0) > 0:
            raise CropYieldError(
                f"this is a ridge fit (l2={state['l2']:g}): its coefficients have no ordinary least-squares standard "
                "errors or intervals; fit with l2=0"
            )
        factor = QRFactor(int(state["num_features"]), *(state[name].double().cpu() for name in _FIELDS))
        fit_intercept = bool(state.get("fit_intercept", True))
        fit = solve(factor, 0.0, state.get("feature_names"), fit_intercept)
        if fit.problems:
            raise CropYieldError(
                f"the data is singular ({fit.problems}): the coefficients' standard errors are not defined"
            )
        cov_type = str(state.get("cov_type", "nonrobust"))
        meat = state.get("meat")
        if cov_type != "nonrobust" and not isinstance(meat, torch.Tensor):
            raise CropYieldError(f"cov_type={cov_type!r} but the fit holds no robust covariance (its pass did not run)")
        nobs = round(float(factor.count))
        q = fit.design.shape[0]
        if nobs <= q:
            raise CropYieldError(f"{nobs} rows for {q} coefficients leave no residual degrees of freedom")
        return _Pieces(factor, fit, fit_intercept, cov_type, meat, nobs, q - int(fit_intercept), nobs - q)

    @property
    def scale_y(self) -> torch.Tensor:
        return self.factor.scale[self.factor.num_features :]

    @property
    def sigma2(self) -> torch.Tensor:
        """Per target ``RSS / df_resid`` (statsmodels' ``scale``)."""
        return self.fit.rss / self.df_resid

    def middle(self) -> torch.Tensor:
        """Per target ``[q, q]``: ``Cov(γ) = R⁻¹ M R⁻ᵀ`` for the scaled coefficients ``γ``, in the
        targets' units: ``M = σ² I`` (nonrobust) or the HC meat (``n / df_resid`` times for HC1)."""
        q = self.fit.design.shape[0]
        if self.cov_type == "nonrobust":
            return self.sigma2[:, None, None] * torch.eye(q, dtype=torch.float64)
        meat = self.meat.double() * self.scale_y[:, None, None] ** 2
        return meat * (self.nobs / self.df_resid) if self.cov_type == "HC1" else meat

    def covariance(self) -> torch.Tensor:
        """Per target, the covariance of ``[Intercept, features]`` (``[features]`` through the origin)."""
        rinv = torch.linalg.solve_triangular(self.fit.design, torch.eye(len(self.fit.design), dtype=torch.float64),
                                             upper=True)  # fmt: skip
        a = to_original(self.factor, self.fit_intercept) @ rinv
        return a @ self.middle() @ a.T

    def condition_number(self) -> float:
        p = self.factor.num_features
        n_map = torch.diag(self.factor.scale[:p])
        if self.fit_intercept:  # [X | 1] = [X̃ | 1] N with x = x̃ s + c
            n_map = torch.eye(p + 1, dtype=torch.float64)
            n_map[range(p), range(p)] = self.factor.scale[:p]
            n_map[p, :p] = self.factor.shift[:p]
        values = torch.linalg.svdvals(self.fit.design @ n_map)
        return float(values[0] / values[-1])


class RegressionSummary:
    """The statistics of an exact least-squares fit, per target, as statsmodels' OLS results give them.

    ``str()`` is a statsmodels-like table per target; :meth:`to_dict` the numbers as plain floats
    and ints. Build it with ``LeastSquaresRegressor.summary(alpha)``.
    """

    def __init__(self, values: dict) -> None:
        self._values = values

    @staticmethod
    def of(state: dict, alpha: float = 0.05) -> RegressionSummary:
        """Computes the summary from a fit's saved state (``LeastSquaresRegressor.fit_state()``)."""
        if not 0 < alpha < 1:
            raise CropYieldError(f"alpha must be in (0, 1), got {alpha}")
        stats = _scipy_stats()
        pieces = _Pieces.of(state)
        fit, n, df_model, df_resid = pieces.fit, pieces.nobs, pieces.df_model, pieces.df_resid
        k_constant = int(pieces.fit_intercept)
        robust = pieces.cov_type != "nonrobust"
        covariance = pieces.covariance()
        names = (["Intercept"] if pieces.fit_intercept else []) + list(state["feature_names"])
        quantile = stats.norm.ppf(1 - alpha / 2) if robust else stats.t.ppf(1 - alpha / 2, df_resid)
        targets = {}
        for j, target in enumerate(state["target_names"]):
            coef = torch.cat([fit.bias[j : j + 1], fit.weight[j]]) if pieces.fit_intercept else fit.weight[j]
            se = covariance[j].diagonal().sqrt()
            t = coef / se
            if robust:
                p_values = 2 * stats.norm.sf(t.abs().numpy())
            else:
                p_values = 2 * stats.t.sf(t.abs().numpy(), df_resid)
            rss, tss = float(fit.rss[j]), float(fit.tss[j])
            r2 = 1 - rss / tss
            if robust:  # a Wald test of every coefficient but the intercept, with the robust covariance
                slopes = coef[k_constant:]
                block = covariance[j][k_constant:, k_constant:]
                f = float(slopes @ torch.linalg.solve(block, slopes)) / df_model
            else:
                f = ((tss - rss) / df_model) / (rss / df_resid)
            llf = -n / 2 * (math.log(2 * math.pi) + math.log(rss / n) + 1)
            terms = {
                name: {
                    "coef": float(coef[i]),
                    "std_err": float(se[i]),
                    "t": float(t[i]),
                    "p": float(p_values[i]),
                    "ci_low": float(coef[i] - quantile * se[i]),
                    "ci_high": float(coef[i] + quantile * se[i]),
                }
                for i, name in enumerate(names)
            }
            targets[target] = {
                "r2": r2,
                "adj_r2": 1 - (n - k_constant) / df_resid * (1 - r2),
                "f": f,
                "f_pvalue": float(stats.f.sf(f, df_model, df_resid)),
                "sigma": math.sqrt(rss / df_resid),
                "log_likelihood": llf,
                "aic": -2 * llf + 2 * (df_model + k_constant),
                "bic": -2 * llf + math.log(n) * (df_model + k_constant),
                "terms": terms,
            }
        return RegressionSummary(
            {
                "nobs": n,
                "df_model": df_model,
                "df_resid": df_resid,
                "cov_type": pieces.cov_type,
                "alpha": float(alpha),
                "condition_number": pieces.condition_number(),
                "targets": targets,
            }
        )

    def to_dict(self) -> dict:
        """``{"nobs", "df_model", "df_resid", "cov_type", "alpha", "condition_number", "targets":
        {target: {"r2", "adj_r2", "f", "f_pvalue", "sigma", "log_likelihood", "aic", "bic", "terms":
        {term: {"coef", "std_err", "t", "p", "ci_low", "ci_high"}}}}}``."""
        return {
            **self._values,
            "targets": {
                name: {**values, "terms": {term: dict(row) for term, row in values["terms"].items()}}
                for name, values in self._values["targets"].items()
            },
        }

    def __str__(self) -> str:
        v = self._values
        robust = v["cov_type"] != "nonrobust"
        stat, prob = ("z", "P>|z|") if robust else ("t", "P>|t|")
        low, high = f"[{v['alpha'] / 2:.3g}", f"{1 - v['alpha'] / 2:.3g}]"
        rule, thin = "=" * 78, "-" * 78
        blocks = []
        for target, t in v["targets"].items():
            left = [("Dep. Variable:", target), ("Model:", "OLS"), ("No. Observations:", str(v["nobs"])),
                    ("Df Residuals:", str(v["df_resid"])), ("Df Model:", str(v["df_model"])),
                    ("Covariance Type:", v["cov_type"]), ("Residual std. err.:", f"{t['sigma']:.6g}")]  # fmt: skip
            right = [("R-squared:", f"{t['r2']:.4f}"), ("Adj. R-squared:", f"{t['adj_r2']:.4f}"),
                     ("F-statistic:", f"{t['f']:.5g}"), ("Prob (F-statistic):", f"{t['f_pvalue']:.3g}"),
                     ("Log-Likelihood:", f"{t['log_likelihood']:.6g}"), ("AIC:", f"{t['aic']:.6g}"),
                     ("BIC:", f"{t['bic']:.6g}")]  # fmt: skip
            lines = [f"{'OLS Regression Results':^78}", rule]
            lines += [f"{a:<20}{b:>18}   {c:<20}{d:>17}" for (a, b), (c, d) in zip(left, right, strict=True)]
            width = max(12, *(len(term) for term in t["terms"]))
            lines += [rule, f"{'':<{width}}{'coef':>11}{'std err':>11}{stat:>9}{prob:>9}{low:>12}{high:>12}", thin]
            for term, r in t["terms"].items():
                lines.append(
                    f"{term:<{width}}{r['coef']:>11.4g}{r['std_err']:>11.4g}{r['t']:>9.3f}{r['p']:>9.3f}"
                    f"{r['ci_low']:>12.4g}{r['ci_high']:>12.4g}"
                )
            lines.append(rule)
            blocks.append("\n".join(lines))
        notes = [f"Condition number: {v['condition_number']:.3g}"]
        if robust:
            notes.append(f"Standard errors are heteroscedasticity robust ({v['cov_type']}).")
        if v["condition_number"] > _LARGE_CONDITION:
            notes.append(
                f"The condition number is large ({v['condition_number']:.2g}): there may be strong multicollinearity "
                "or other numerical problems (or the features are far from zero: see standardize)."
            )
        return "\n\n".join(blocks) + "\n" + "\n".join(notes)


@dataclass(frozen=True)
class Prediction:
    """Predictions with their interval, float64 ``[rows, targets]`` each."""

    mean: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def prediction_intervals(state: dict, x: torch.Tensor, level: float = 0.95, kind: str = "prediction") -> Prediction:
    """Intervals at ``level`` for rows of raw inputs ``x``, as statsmodels'
    ``get_prediction(x).summary_frame(alpha=1 - level)`` gives them: ``obs_ci_*`` for
    ``kind="prediction"`` (a new observation), ``mean_ci_*`` for ``kind="mean"`` (its expected value).

    Raises:
        CropYieldError: no exact least-squares fit backs ``state``, or ``level`` / ``kind`` is wrong.
    """
    if kind not in ("prediction", "mean"):
        raise CropYieldError(f"kind must be 'prediction' or 'mean', got {kind!r}")
    if not 0 < level < 1:
        raise CropYieldError(f"interval must be a level in (0, 1) such as 0.95, got {level}")
    stats = _scipy_stats()
    pieces = _Pieces.of(state)
    fit = pieces.fit
    x = x.double().cpu()
    mean = x @ fit.weight.T + fit.bias
    z = whitened(fit.design, scaled_design(pieces.factor, x, pieces.fit_intercept))  # [q, rows]
    variance = torch.einsum("ir,tij,jr->rt", z, pieces.middle(), z)  # zᵀ M z per row and target
    if kind == "prediction":
        variance = variance + pieces.sigma2
    robust = pieces.cov_type != "nonrobust"
    quantile = stats.norm.ppf((1 + level) / 2) if robust else stats.t.ppf((1 + level) / 2, pieces.df_resid)
    half = float(quantile) * variance.sqrt()
    return Prediction(mean, mean - half, mean + half)
