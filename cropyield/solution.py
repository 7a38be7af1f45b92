"""The least-squares solution from a :class:`~cropyield.reference.QRFactor`, and what derives from it.

:func:`solve` gives the exact (or ridge) fit by triangular solves, the rank decided on the
column-normalized factor and the minimum-norm answer on singular data; :func:`least_squares` the
same for rows in memory. The rest serve the statistics of :mod:`cropyield.summary` (the scaled
design rows, their whitening by the factor, the map back to the raw coefficients), the float32
weights of the fitted ``nn.Linear`` and the largest stable SGD step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cropyield.reference import ONE_INTRA_OP_THREAD, QRFactor

_RANK_TOL = 1e-13  # singular values of the column-normalized design below this (relative) are zero
_F64 = torch.float64


@dataclass(frozen=True)
class LeastSquares:
    """The least-squares fit ``targets ≈ inputs @ weight.T + bias``, in float64, with what its
    statistics need (see :mod:`cropyield.summary`).

    ``problems`` names what makes the data singular (constant or collinear columns, too few rows);
    the solution is then the minimum-norm one. ``design`` is the R factor of the scaled design
    ``[X̃ | 1]`` (``[X̃]`` through the origin), ``coef_scaled`` the coefficients on it in units of the
    scaled targets, ``rss`` and ``tss`` (centred with an intercept) in the targets' units.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mse: float
    problems: str | None = None
    rank: int = 0
    fit_intercept: bool = True
    design: torch.Tensor | None = None
    coef_scaled: torch.Tensor | None = None  # [q, targets]
    rss: torch.Tensor | None = None  # [targets]
    tss: torch.Tensor | None = None  # [targets]


def solve(
    factor: QRFactor,
    l2: float = 0.0,
    feature_names: list[str] | tuple[str, ...] | None = None,
    fit_intercept: bool = True,
) -> LeastSquares:
    """Solves least squares (ridge with ``l2 > 0``) from a :class:`QRFactor`, by triangular solves.

    Minimizes ``‖Y - X Wᵀ - b‖² + l2 ‖W‖²`` with the intercept not penalized, as scikit-learn's
    ``Ridge(alpha=l2)`` does; ``fit_intercept=False`` fits ``Y ≈ X Wᵀ``. Rank is decided on the
    column-normalized factor, so it does not depend on the columns' units. On singular data
    (``l2 == 0``) it returns the minimum-norm solution, as ``lstsq`` does on centred data, and
    names the columns at fault in ``problems``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> y = x[:, :1] * 1 + x[:, 1:] * 2 + 3
        >>> fit = solve(QRFactor.of(torch.cat([x, y], dim=1), num_features=2))
        >>> fit.weight.round(decimals=6).tolist(), fit.bias.round(decimals=6).tolist(), round(fit.mse, 9)
        ([[1.0, 2.0]], [3.0], 0.0)
    """
    f = factor.to("cpu")  # a few numbers: the solvers below are CPU ones
    p, k = f.num_features, f.r.shape[0]
    t = k - 1 - p
    names = list(feature_names) if feature_names is not None else [f"feature_{i}" for i in range(p)]
    n = float(f.count)
    if n == 0:
        raise ValueError("no rows to solve least squares on")
    if not fit_intercept and bool((f.shift != 0).any()):
        f = f.moved(torch.zeros_like(f.shift), f.scale)  # the origin must be the data's own
    constant = (f.low[:p] == f.high[:p]) if fit_intercept else torch.zeros(p, dtype=torch.bool)
    active = [i for i in range(p) if not constant[i]]
    design_cols = active + ([p] if fit_intercept else [])
    q = len(design_cols)
    r = f.sub(design_cols + list(range(p + 1, k)))
    if l2 > 0:
        # The penalty l2 Σ W² in the scaled units (the targets' scale divides out of every term).
        penalty = torch.zeros(len(active), r.shape[1], dtype=_F64)
        penalty[range(len(active)), range(len(active))] = l2**0.5 / f.scale[active]
        r = torch.linalg.qr(torch.cat([r, penalty]), mode="r").R
    rd, cross = r[:q, :q], r[:q, q:]
    problems = []
    if l2 == 0:
        if constant.any():
            problems.append(f"constant column(s) {[names[i] for i in constant.nonzero().flatten().tolist()]}")
        norms = rd.square().sum(0).sqrt()
        _, s, vh = torch.linalg.svd(rd / torch.where(norms > 0, norms, torch.ones_like(norms)))
        null = s <= _RANK_TOL * s[0] if len(s) and s[0] > 0 else torch.ones(len(s), dtype=torch.bool)
        if n <= p:
            problems.append(f"only {int(n)} rows for {p} features")
        elif null.any():
            involved = (vh[null][:, : len(active)].abs() > 1e-6).any(0)
            problems.append(f"collinear column(s) {[names[active[i]] for i in involved.nonzero().flatten()]}")
        rank = int((~null).sum())
    else:
        rank = q
    scale_x, scale_y = f.scale[:p], f.scale[p:]
    weight = torch.zeros(t, p, dtype=_F64)
    if rank == q:
        coef = torch.linalg.solve_triangular(rd, cross, upper=True)  # [q, t], scaled units
    else:
        # The minimum-norm solution on the centred features in their own units, as lstsq gives.
        order = [p, *active, *range(p + 1, k)] if fit_intercept else design_cols + list(range(p + 1, k))
        rc = f.sub(order)[int(fit_intercept) :, int(fit_intercept) :]
        m = len(active)
        a = rc[:m, :m] * scale_x[active] / (scale_y[None, :1] * 0 + 1)  # features in their units
        b = rc[:m, m:] * scale_y
        w_active = torch.linalg.pinv(a, rtol=_RANK_TOL**0.5) @ b  # [m, t] original units
        coef = torch.zeros(q, t, dtype=_F64)
        coef[:m] = w_active * scale_x[active, None] / scale_y
        if fit_intercept:
            # The intercept from the means: ȳ = x̄ W + b on the scaled columns.
            head = f.sub([p, *active, *range(p + 1, k)])[0]
            coef[m] = (head[1 + m :] - head[1 : 1 + m] @ coef[:m]) / head[0]
    weight[:, active] = (coef[: len(active)] * scale_y[None, :] / scale_x[active, None]).T
    if fit_intercept:
        bias = f.shift[p:] + scale_y * coef[len(active)] - weight @ f.shift[:p]
    else:
        bias = torch.zeros(t, dtype=_F64)
    rss = f.residual_factor(weight, bias).square().sum(0) if rank < q or l2 > 0 else None
    if rss is None:
        rss = r[q:, q:].square().sum(0) * scale_y**2
    tss = f.centred_tss() if fit_intercept else (f.r[:, p + 1 :].square().sum(0) * scale_y**2)
    return LeastSquares(
        weight, bias, float((rss / n).mean()), "; ".join(problems) or None, rank, fit_intercept, rd, coef, rss, tss
    )


def least_squares(
    inputs: torch.Tensor, targets: torch.Tensor, l2: float = 0.0, fit_intercept: bool = True
) -> LeastSquares:
    """Solves least squares on in-memory rows in float64 (one pass, blocks of 131,072 rows).

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> fit = least_squares(x, x[:, :1] * 1 + x[:, 1:] * 2 + 3)
        >>> fit.weight.round(decimals=6).tolist(), fit.bias.round(decimals=6).tolist(), round(fit.mse, 9)
        ([[1.0, 2.0]], [3.0], 0.0)
    """
    rows = torch.cat([inputs.to(_F64), targets.to(_F64)], dim=1)
    return solve(QRFactor.of_table(rows, inputs.shape[1], center=fit_intercept), l2, fit_intercept=fit_intercept)


def scaled_design(factor: QRFactor, x: torch.Tensor, fit_intercept: bool = True) -> torch.Tensor:
    """Rows of inputs as the columns of the scaled design the fit solved: ``[(x - shift) / scale | 1]``."""
    with ONE_INTRA_OP_THREAD:
        columns = factor.scaled_columns(x, origin=not fit_intercept)  # solve moved such a factor to the origin
        return columns[: factor.num_features + int(fit_intercept)].T.clone()


def whitened(design: torch.Tensor, scaled_rows: torch.Tensor) -> torch.Tensor:
    """``R⁻ᵀ ã`` for each scaled design row ``ã`` (``[q, rows]``): its squared norm is the row's
    leverage ``h = x (XᵀX)⁻¹ xᵀ``, and ``Σ w zzᵀ`` the middle of a sandwich covariance."""
    return torch.linalg.solve_triangular(design.T.to(scaled_rows), scaled_rows.T, upper=False)


def to_original(factor: QRFactor, fit_intercept: bool = True) -> torch.Tensor:
    """``G`` with ``β = G γ`` up to the targets' scale and shift: the map from coefficients on the
    scaled design ``[X̃ | 1]`` to coefficients ``[Intercept, X]`` on the raw design (``[X]`` through
    the origin). ``(XᵀX)⁻¹ = G R⁻¹ R⁻ᵀ Gᵀ`` for the design factor ``R``."""
    p = factor.num_features
    shift, scale = factor.shift[:p].cpu(), factor.scale[:p].cpu()
    if not fit_intercept:
        return torch.diag(1 / scale)
    g = torch.zeros(p + 1, p + 1, dtype=_F64)
    g[1:, :p] = torch.diag(1 / scale)
    g[0, :p] = -shift / scale  # the intercept absorbs the shifts
    g[0, p] = 1
    return g


def float32_fit(fit: LeastSquares, factor: QRFactor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit as float32 weights, the bias recomputed for the rounded weights.

    Rounding ``W`` to float32 moves predictions by ``δW · x̄``, which is large when features sit far
    from zero; recomputing ``b = ȳ - W₃₂ x̄`` in float64 cancels that shift.
    """
    weight = fit.weight.float()
    if not fit.fit_intercept:
        return weight, fit.bias.float()
    mean, _ = factor.to("cpu").feature_scale()
    y_mean = fit.bias + fit.weight @ mean
    return weight, (y_mean - weight.double() @ mean).float()


def max_stable_lr(factor: QRFactor) -> float:
    """The largest stable full-batch SGD step on the MSE loss: 2 / the Hessian's largest eigenvalue.

    For ``mean((x̃ W̃ᵀ - y)²)`` over ``n`` rows and ``t`` targets (``x̃`` = inputs with a 1 for the
    bias), the Hessian has eigenvalues ``2 λ(x̃ᵀx̃) / (n t)``, so the bound is ``n t / λmax(x̃ᵀx̃)``;
    ``λmax(x̃ᵀx̃)`` is the largest squared singular value of the design factor in the raw units.
    """
    f = factor.to("cpu")
    p = f.num_features
    rd = f.sub(list(range(p + 1)))
    # [X | 1] = [X̃ | 1] N with x = x̃ s + c.
    n_map = torch.eye(p + 1, dtype=_F64)
    n_map[range(p), range(p)] = f.scale[:p]
    n_map[p, :p] = f.shift[:p]
    largest = torch.linalg.svdvals(rd @ n_map)[0] ** 2
    num_targets = len(f.shift) - p
    return float(f.count * num_targets / largest)
