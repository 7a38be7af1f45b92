"""Plain-PyTorch references, and the one least-squares accumulator.

:class:`QRFactor` holds, in float64, the upper-triangular factor ``R`` of the rows ``[X | 1 | Y]``
(features, a column of ones, targets), each column shifted by the first block's mean and scaled
by its spread, so that ``RᵀR`` is the cross-product matrix of those rows. Blocks of rows are
factored one at a time on top of the running ``R`` (a QR of the stacked factors, as R's biglm and
Spark's ``tallSkinnyQR`` do), and factors of different processes merge by one more QR, so one
streaming pass over data of any size gives, in ``O(columns²)`` memory and without ever forming
``XᵀX`` (which squares the condition number), everything the package needs: the exact
least-squares (or ridge) solution, the residual sums of squares, the statistics of
:mod:`cropyield.summary`, the optimum printed after every fit, the MSE and R² of any linear
weights, the feature statistics of ``standardize=True`` and the largest stable SGD step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

_CHUNK = 2048  # rows per Householder QR of a block's batched factorization (fits in cache)
_BLOCK = 1 << 17  # rows converted to float64 at a time
_RANK_TOL = 1e-13  # singular values of the column-normalized design below this (relative) are zero
_F64 = torch.float64


class OneIntraOpThread:
    """Runs the accumulator's work on one intra-op thread, restoring the count after.

    Its operations are small (a few hundred microseconds each): on this project's shared 2-core
    machine two OpenMP threads measured 10-20x slower than one on them whenever another process
    held a core (each operation waits at a barrier for a thread that is not running), and at best
    a third faster when the machine was idle. Re-entrant and shared by threads (a count under a lock).
    """

    def __init__(self) -> None:
        self.lock, self.depth, self.saved = threading.Lock(), 0, 1

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                torch.set_num_threads(self.saved)


ONE_INTRA_OP_THREAD = OneIntraOpThread()
_WORKSPACES = threading.local()  # one float64 work buffer per thread, reused by every update


def _workspace(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """A float64 ``[rows, columns]`` work buffer, kept between updates (allocating and first
    touching 6 MB for every batch of 131,072 rows measured a tenth of the update)."""
    buffer = getattr(_WORKSPACES, "buffer", None)
    if buffer is None or buffer.shape[0] != rows or buffer.shape[1] < columns or buffer.device != device:
        buffer = torch.empty(rows, columns, dtype=_F64, device=device)
        _WORKSPACES.buffer = buffer
    return buffer[:, :columns]


def _standardize_(rows: torch.Tensor, data: list[int], shift: torch.Tensor, scale: torch.Tensor) -> None:
    """``(z - shift) / scale`` in place on the rows ``data`` of ``rows``; the column of ones stays 1."""
    shifts = torch.zeros(len(rows), 1, dtype=_F64, device=rows.device)
    inverse = torch.ones_like(shifts)
    shifts[data, 0], inverse[data, 0] = shift, 1 / scale
    rows.sub_(shifts).mul_(inverse)


@dataclass  # not frozen: torchmetrics maps over the fields of what `compute` returns
class QRFactor:
    """The R factor of the shifted, scaled rows ``[X | 1 | Y]``, in float64.

    Data column ``i`` (features, then targets) is factor column ``i`` for a feature and ``i + 1``
    for a target; factor column ``num_features`` is the column of ones. ``shift`` and ``scale``
    are per data column: the factor is that of ``(z - shift) / scale``. ``low`` and ``high`` are
    the columns' extremes (a column is constant when they are equal). Merging two factors gives
    the factor of the two tables stacked (to float64 rounding), in any grouping.
    """

    num_features: int
    count: torch.Tensor  # float64 scalar
    shift: torch.Tensor  # [features + targets]
    scale: torch.Tensor  # [features + targets]
    r: torch.Tensor  # [k, k], k = features + 1 + targets
    low: torch.Tensor  # [features + targets]
    high: torch.Tensor  # [features + targets]

    @staticmethod
    def empty(num_features: int, num_targets: int, device: torch.device | str | None = None) -> QRFactor:
        width = num_features + num_targets
        zeros = torch.zeros(width, dtype=_F64, device=device)
        inf = torch.full((width,), float("inf"), dtype=_F64, device=device)
        k = width + 1
        return QRFactor(num_features, zeros.new_zeros(()), zeros, zeros + 1, zeros.new_zeros(k, k), inf, -inf)

    @staticmethod
    def of(rows: torch.Tensor, num_features: int, center: bool = True) -> QRFactor:
        """The factor of one block of rows ``[rows, features + targets]`` (any float dtype, any device).
        ``center=False`` shifts nothing (for fits through the origin)."""
        return QRFactor.empty(num_features, rows.shape[1] - num_features, rows.device).update(rows, center=center)

    @staticmethod
    def of_table(rows: torch.Tensor, num_features: int, center: bool = True, chunk: int = 1 << 17) -> QRFactor:
        """The factor of a whole table, block by block, so float64 temporaries stay small."""
        factor = QRFactor.empty(num_features, rows.shape[1] - num_features, rows.device)
        for block in rows.split(chunk):
            factor = factor.update(block, center=center)
        return factor

    @property
    def columns(self) -> list[int]:
        """The factor column of each data column."""
        p, width = self.num_features, len(self.shift)
        return [i if i < p else i + 1 for i in range(width)]

    def update(self, *blocks: torch.Tensor, center: bool = True) -> QRFactor:
        """This factor with a block of rows added: ``[rows, features + targets]``, or several
        blocks side by side (``inputs, targets``), in any float dtype.

        The first non-empty block fixes the shift (its means, or 0 without ``center``) and the
        scale (its spread around the shift; 1 for a column constant in it).
        """
        n = len(blocks[0])
        if n == 0:
            return self
        if n > _BLOCK:  # float64 work memory stays small
            factor = self
            for parts in zip(*(block.split(_BLOCK) for block in blocks), strict=True):
                factor = factor.update(*parts, center=center)
            return factor
        with ONE_INTRA_OP_THREAD:
            return self._update(blocks, n, center)

    def _update(self, blocks: tuple[torch.Tensor, ...], n: int, center: bool) -> QRFactor:
        p, width = self.num_features, len(self.shift)
        k = width + 1
        size = min(n, _CHUNK)
        chunks = -(-n // size)
        # The rows as float64 columns [X, 1, Y], row-major over the chunks: each chunk of `size`
        # rows is a [size, k] matrix in LAPACK's column-major layout, and each step below is one
        # operation over all the rows.
        work = self._copied(blocks, chunks * size)
        rows = work[:, :n]
        data = self.columns
        extremes = torch.stack([rows.amin(1), rows.amax(1)])[:, data]  # the raw values', on the contiguous copy
        low, high = torch.minimum(self.low, extremes[0]), torch.maximum(self.high, extremes[1])
        shift, scale = self.shift, self.scale
        if float(self.count) == 0:
            # Summed down the rows of a row-major copy: summed in another order, the scale's last bit
            # moved and Wampler5's digits with it (6.2 to 5.9; its bound is 6).
            first = rows[data].T.contiguous()
            shift = first.mean(0) if center else torch.zeros_like(self.shift)
            if center:  # a column constant in the block is shifted to exactly 0 by its own value
                shift = torch.where(extremes[0] == extremes[1], first[0], shift)
            spread = (first - shift).square().mean(0).sqrt()
            scale = torch.where((spread > 0) & torch.isfinite(spread), spread, torch.ones_like(spread))
        _standardize_(rows, data, shift, scale)
        work[:, n:] = 0  # the last chunk's unused rows add nothing to the factor
        rs = torch.linalg.qr(work.view(k, chunks, size).permute(1, 2, 0), mode="r").R  # [chunks, k, k]
        r = torch.linalg.qr(torch.cat([self.r, rs.reshape(-1, k)]), mode="r").R
        factor = QRFactor(p, self.count + n, shift, scale, r, low, high)
        before = int(self.count)
        if center and before and before.bit_length() < (before + n).bit_length():
            # Each time the rows double, the shift moves to the means so far: a first block unlike
            # the rest (sorted data) would otherwise cost digits (Wampler5 in batches of 8: 5.7 -> 6.1).
            factor = factor.recentred()
        return factor

    def _copied(self, blocks: tuple[torch.Tensor, ...], length: int) -> torch.Tensor:
        """The work buffer ``[columns, length]`` with the blocks' rows (data columns from the first,
        at least the features) in its first columns, as float64 factor columns ``[X, 1, Y]``."""
        p, width = self.num_features, sum(block.shape[1] for block in blocks)
        work = _workspace(len(self.shift) + 1, length, blocks[0].device)[: width + 1]
        rows = work[:, : len(blocks[0])]
        rows[p] = 1
        column = 0
        for block in blocks:  # converted and transposed in one pass
            for lo, hi in ((column, min(column + block.shape[1], p)), (max(column, p), column + block.shape[1])):
                if lo < hi:
                    rows[lo + (lo >= p) : hi + (lo >= p)].copy_(block[:, lo - column : hi - column].T)
            column += block.shape[1]
        return work

    def scaled_columns(self, *blocks: torch.Tensor, origin: bool = False) -> torch.Tensor:
        """The blocks' rows (inputs, then optionally targets) as the factor's scaled columns,
        ``[X̃ | 1 | Ỹ]`` transposed: ``[columns, rows]`` float64, a view of a buffer the next call
        reuses. ``origin``: shifted by nothing (as :func:`solve` moves a fit through the origin)."""
        rows = self._copied(blocks, len(blocks[0]))
        data = self.columns[: rows.shape[0] - 1]
        shift = torch.zeros_like(self.shift) if origin else self.shift
        _standardize_(rows, data, shift[: len(data)].to(rows), self.scale[: len(data)].to(rows))
        return rows

    def merge(self, other: QRFactor) -> QRFactor:
        """The factor of this table followed by ``other``'s (``other`` moved to this one's shift and scale)."""
        if float(other.count) == 0:
            return self
        if float(self.count) == 0:
            return other
        moved = other.moved(self.shift, self.scale)
        r = torch.linalg.qr(torch.cat([self.r, moved.r]), mode="r").R
        return QRFactor(
            self.num_features,
            self.count + other.count,
            self.shift,
            self.scale,
            r,
            torch.minimum(self.low, other.low),
            torch.maximum(self.high, other.high),
        )

    def moved(self, shift: torch.Tensor, scale: torch.Tensor) -> QRFactor:
        """The factor of the same rows shifted and scaled by ``shift`` and ``scale`` instead."""
        shift, scale = shift.to(self.r), scale.to(self.r)
        k, p = self.r.shape[0], self.num_features
        # (z - c') / s' = z̃ s / s' + (c - c') / s' · 1: a linear map of the factor's columns.
        t = torch.eye(k, dtype=_F64, device=self.r.device)
        cols = torch.tensor(self.columns, device=self.r.device)
        t[cols, cols] = self.scale / scale
        t[p, cols] = (self.shift - shift) / scale
        r = torch.linalg.qr(self.r @ t, mode="r").R
        return QRFactor(p, self.count, shift, scale, r, self.low, self.high)

    def recentred(self) -> QRFactor:
        """The same rows' factor, shifted by their means and scaled by their spread so far."""
        p, k = self.num_features, self.r.shape[0]
        r = self.sub([p, *range(p), *range(p + 1, k)])  # [1 | Z]: the sums, then the centred factor
        spread = (r[1:, 1:].square().sum(0) / self.count).sqrt()
        constant = self.low == self.high  # stays exactly 0 where it is
        shift = torch.where(constant, self.shift, self.shift + self.scale * r[0, 1:] / r[0, 0])
        scale = self.scale * torch.where((spread > 0) & ~constant, spread, torch.ones_like(spread))
        return self.moved(shift, scale)

    def to(self, device: torch.device | str) -> QRFactor:
        fields = (self.count, self.shift, self.scale, self.r, self.low, self.high)
        return QRFactor(self.num_features, *(t.to(device) for t in fields))

    def sub(self, columns: list[int]) -> torch.Tensor:
        """The R factor of the factor columns ``columns``, in that order."""
        return torch.linalg.qr(self.r[:, columns], mode="r").R

    def feature_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation (population; 1 where a column is constant)."""
        p = self.num_features
        r = self.sub([p, *range(p)])  # [1 | X]: the first row holds the sums, the rest the centred factor
        n = self.count
        mean_scaled = r[0, 1:] / r[0, 0]
        std_scaled = (r[1:, 1:].square().sum(0) / n).sqrt()
        mean = self.shift[:p] + self.scale[:p] * mean_scaled
        std = self.scale[:p] * std_scaled
        constant = self.low[:p] == self.high[:p]
        return mean, torch.where((std > 0) & ~constant, std, torch.ones_like(std))

    def scaled(self, mean: torch.Tensor, std: torch.Tensor) -> QRFactor:
        """The factor of the same rows with features replaced by ``(x - mean) / std`` (the same R)."""
        p = self.num_features
        mean, std = mean.to(self.r), std.to(self.r)
        shift, scale = self.shift.clone(), self.scale.clone()
        low, high = self.low.clone(), self.high.clone()
        shift[:p] = (self.shift[:p] - mean) / std
        scale[:p] = self.scale[:p] / std
        low[:p], high[:p] = (self.low[:p] - mean) / std, (self.high[:p] - mean) / std
        return QRFactor(p, self.count, shift, scale, self.r, low, high)

    def residual_factor(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``R u`` for each target, where ``[X̃ | 1 | Ỹ] u`` is that target's residual ``y - x Wᵀ - b``."""
        p, k = self.num_features, self.r.shape[0]
        w, b = weight.to(self.r), bias.to(self.r)
        t = w.shape[0]
        u = torch.zeros(k, t, dtype=_F64, device=self.r.device)
        u[:p] = -(w * self.scale[:p]).T
        u[p] = self.shift[p:] - w @ self.shift[:p] - b
        u[p + 1 + torch.arange(t), torch.arange(t)] = self.scale[p:]
        return self.r @ u

    def mse(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-target mean squared error of ``x @ weight.T + bias`` on the factored rows."""
        return self.residual_factor(weight, bias).square().sum(0) / self.count

    def centred_tss(self) -> torch.Tensor:
        """Per-target total sum of squares around the mean."""
        p, k = self.num_features, self.r.shape[0]
        r = self.sub([p, *range(p + 1, k)])  # [1 | Y]
        return r[1:, 1:].square().sum(0) * self.scale[p:] ** 2

    def r2(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-target coefficient of determination of ``x @ weight.T + bias``."""
        return 1 - self.mse(weight, bias) * self.count / self.centred_tss()


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
