"""Plain-PyTorch references, and the one least-squares accumulator.

:class:`Moments` holds the float64 sufficient statistics of a table of rows ``[features | targets]``:
the row count, the column means and the centred co-moment matrix. Blocks of rows are summarized
one at a time and merged with Chan's parallel update, so one streaming pass over data of any size
gives, in ``O(columns²)`` memory, everything the package needs: the exact least-squares (or ridge)
solution that :class:`~cropyield.model.LeastSquaresRegressor` fits, the optimum printed after every
fit, the MSE and R² of any linear weights, the feature statistics of ``standardize=True``, and the
largest stable SGD step. Centring per block keeps the precision that raw ``XᵀX`` (which squares the
condition number) loses when features sit far from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch

_CHUNK = 1 << 20  # rows summarized at a time: keeps float64 work memory small on millions of rows
_RANK_TOL = 1e-10  # eigenvalues of the feature correlation matrix below this (relative) are zero


@dataclass  # not frozen: torchmetrics maps over the fields of what `compute` returns
class Moments:
    """Count, means and centred co-moments of the columns of a table, in float64.

    ``comoment[i, j] = Σ_rows (z_i - mean_i)(z_j - mean_j)``. Merging two summaries gives exactly
    the summary of the two tables stacked (to float64 rounding), in any grouping.
    """

    count: torch.Tensor  # float64 scalar
    mean: torch.Tensor  # [columns]
    comoment: torch.Tensor  # [columns, columns]

    @staticmethod
    def of(*blocks: torch.Tensor, work: torch.Tensor | None = None) -> Moments:
        """Summarizes one block of rows ``[rows, columns]`` (any float dtype, any device), or several
        blocks side by side (``inputs, targets``). ``work``, a float64 tensor of at least that
        shape, is used for the centred copy instead of a new allocation."""
        n, width = len(blocks[0]), sum(b.shape[1] for b in blocks)
        if work is None or work.shape[0] < n or work.shape[1] != width:
            work = torch.empty(n, width, dtype=torch.float64, device=blocks[0].device)
        centred, start = work[:n], 0
        for block in blocks:
            centred[:, start : start + block.shape[1]].copy_(block)
            start += block.shape[1]
        mean = centred.mean(0) if n else centred.new_zeros(width)
        centred -= mean
        return Moments(centred.new_tensor(float(n)), mean, centred.T @ centred)

    @staticmethod
    def empty(columns: int, device: torch.device | str | None = None) -> Moments:
        zeros = torch.zeros(columns, dtype=torch.float64, device=device)
        return Moments(zeros.new_zeros(()), zeros, zeros.new_zeros(columns, columns))

    @staticmethod
    def of_table(rows: torch.Tensor, chunk: int = _CHUNK) -> Moments:
        """Summarizes a whole table block by block, so float64 temporaries stay small."""
        work = torch.empty(min(chunk, len(rows)), rows.shape[1], dtype=torch.float64, device=rows.device)
        parts = [Moments.of(block, work=work) for block in rows.split(chunk)]
        return reduce(Moments.merge, parts, Moments.empty(rows.shape[1], rows.device))

    def merge(self, other: Moments) -> Moments:
        """The summary of this table followed by ``other``'s (Chan, Golub and LeVeque's update)."""
        n = self.count + other.count
        safe = n.clamp_min(1.0)  # both empty: stays empty; no host sync, so it is cheap on a GPU
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe)
        comoment = self.comoment + other.comoment + torch.outer(delta, delta) * (self.count * other.count / safe)
        return Moments(n, mean, comoment)

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count.to(device), self.mean.to(device), self.comoment.to(device))

    def feature_scale(self, num_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation (population; 1 where a column is constant)."""
        mean = self.mean[:num_features]
        std = (self.comoment.diagonal()[:num_features] / self.count).clamp_min(0).sqrt()
        return mean, torch.where(std > 0, std, torch.ones_like(std))

    def scaled(self, num_features: int, mean: torch.Tensor, std: torch.Tensor) -> Moments:
        """The summary of the same rows with features replaced by ``(x - mean) / std``."""
        scale = torch.ones_like(self.mean)
        scale[:num_features] = std.double()
        shift = torch.zeros_like(self.mean)
        shift[:num_features] = mean.double()
        return Moments(self.count, (self.mean - shift) / scale, self.comoment / torch.outer(scale, scale))

    def mse(self, num_features: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-target mean squared error of ``x @ weight.T + bias`` on the summarized rows."""
        p = num_features
        w, b = weight.double().to(self.mean.device), bias.double().to(self.mean.device)
        cxx, cxy, cyy = self.comoment[:p, :p], self.comoment[:p, p:], self.comoment[p:, p:]
        # Σ (y - ŷ)² = Σ ((y - ȳ) - W(x - x̄))² + n (ȳ - W x̄ - b)²
        centred = cyy.diagonal() - 2 * (w * cxy.T).sum(1) + (w * (w @ cxx)).sum(1)
        offset = self.mean[p:] - w @ self.mean[:p] - b
        return (centred.clamp_min(0) + self.count * offset**2) / self.count

    def r2(self, num_features: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-target coefficient of determination of ``x @ weight.T + bias``."""
        variance = self.comoment.diagonal()[num_features:] / self.count
        return 1 - self.mse(num_features, weight, bias) / variance


@dataclass(frozen=True)
class LeastSquares:
    """The least-squares fit ``targets ≈ inputs @ weight.T + bias``, in float64.

    ``problems`` names what makes the data singular (constant or collinear columns, too few rows);
    the solution is then the minimum-norm one.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mse: float
    problems: str | None = None


def solve(
    moments: Moments, num_features: int, l2: float = 0.0, feature_names: list[str] | tuple[str, ...] | None = None
) -> LeastSquares:
    """Solves least squares (ridge with ``l2 > 0``) from a :class:`Moments` summary.

    Minimizes ``‖Y - X Wᵀ - b‖² + l2 ‖W‖²`` with the intercept not penalized, as scikit-learn's
    ``Ridge(alpha=l2)`` does. On singular data (``l2 == 0``) it returns the minimum-norm solution, as
    ``lstsq`` does, and names the columns at fault in ``problems``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> y = x[:, :1] * 1 + x[:, 1:] * 2 + 3
        >>> fit = solve(Moments.of(torch.cat([x, y], dim=1)), num_features=2)
        >>> fit.weight.round(decimals=6).tolist(), fit.bias.round(decimals=6).tolist(), round(fit.mse, 9)
        ([[1.0, 2.0]], [3.0], 0.0)
    """
    m = moments.to("cpu")  # a few numbers: the eigen-solvers below are CPU ones
    p = num_features
    names = list(feature_names) if feature_names is not None else [f"feature_{i}" for i in range(p)]
    if float(m.count) == 0:
        raise ValueError("no rows to solve least squares on")
    cxx, cxy = m.comoment[:p, :p], m.comoment[:p, p:]
    variance = cxx.diagonal()
    # A column is constant when its spread is below float32's resolution of its values.
    constant = variance <= m.count * (m.mean[:p].abs() * 2**-24) ** 2
    active = (~constant).nonzero().flatten()
    problems = []
    if l2 == 0:
        if constant.any():
            problems.append(f"constant column(s) {[names[i] for i in constant.nonzero().flatten().tolist()]}")
        if len(active):
            d = variance[active].sqrt()
            corr = cxx[active][:, active] / torch.outer(d, d)
            values, vectors = torch.linalg.eigh(corr)
            null = values <= _RANK_TOL * len(active)
            if float(m.count) <= p:
                problems.append(f"only {int(m.count)} rows for {p} features")
            elif null.any():
                involved = (vectors[:, null].abs() > 1e-6).any(1)
                problems.append(f"collinear column(s) {[names[active[i]] for i in involved.nonzero().flatten()]}")
        rank = int(len(active) - null.sum()) if len(active) else 0
    else:
        rank = p
    a = cxx + l2 * torch.eye(p, dtype=torch.float64)
    if rank == p:
        # Full rank: solve on the correlation scale, where the system is best conditioned.
        d = a.diagonal().sqrt()
        w_t = torch.linalg.solve(a / torch.outer(d, d), cxy / d[:, None]) / d[:, None]
    else:
        # The pseudo-inverse of Cxx keeps the `rank` largest eigen-directions: the minimum-norm solution.
        values, vectors = torch.linalg.eigh(a)
        kept = values.argsort(descending=True)[:rank]
        w_t = vectors[:, kept] @ ((vectors[:, kept].T @ cxy) / values[kept, None]) if rank else torch.zeros_like(cxy)
    weight = w_t.T.contiguous()
    bias = m.mean[p:] - weight @ m.mean[:p]
    mse = float(m.mse(p, weight, bias).mean())
    return LeastSquares(weight, bias, mse, "; ".join(problems) or None)


def least_squares(inputs: torch.Tensor, targets: torch.Tensor, l2: float = 0.0) -> LeastSquares:
    """Solves least squares on in-memory rows in float64 (one pass, blocks of a million rows).

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> fit = least_squares(x, x[:, :1] * 1 + x[:, 1:] * 2 + 3)
        >>> fit.weight.round(decimals=6).tolist(), fit.bias.round(decimals=6).tolist(), round(fit.mse, 9)
        ([[1.0, 2.0]], [3.0], 0.0)
    """
    work = torch.empty(min(_CHUNK, len(inputs)), inputs.shape[1] + targets.shape[1], dtype=torch.float64)
    parts = [Moments.of(x, y, work=work) for x, y in zip(inputs.split(_CHUNK), targets.split(_CHUNK), strict=True)]
    return solve(reduce(Moments.merge, parts), inputs.shape[1], l2)


def float32_fit(fit: LeastSquares, moments: Moments, num_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit as float32 weights, the bias recomputed for the rounded weights.

    Rounding ``W`` to float32 moves predictions by ``δW · x̄``, which is large when features sit far
    from zero; recomputing ``b = ȳ - W₃₂ x̄`` in float64 cancels that shift.
    """
    weight = fit.weight.float()
    bias = moments.mean[num_features:].cpu() - weight.double() @ moments.mean[:num_features].cpu()
    return weight, bias.float()


def max_stable_lr(moments: Moments, num_features: int) -> float:
    """The largest stable full-batch SGD step on the MSE loss: 2 / the Hessian's largest eigenvalue.

    For ``mean((x̃ W̃ᵀ - y)²)`` over ``n`` rows and ``t`` targets (``x̃`` = inputs with a 1 for the
    bias), the Hessian has eigenvalues ``2 λ(x̃ᵀx̃) / (n t)``, so the bound is ``n t / λmax(x̃ᵀx̃)``;
    ``x̃ᵀx̃`` is rebuilt from the summary: ``[[C + n x̄x̄ᵀ, n x̄], [n x̄ᵀ, n]]``.
    """
    m = moments.to("cpu")
    p, n = num_features, m.count
    mean = m.mean[:p]
    gram = torch.empty(p + 1, p + 1, dtype=torch.float64)
    gram[:p, :p] = m.comoment[:p, :p] + n * torch.outer(mean, mean)
    gram[:p, p] = gram[p, :p] = n * mean
    gram[p, p] = n
    num_targets = len(m.mean) - p
    return float(n * num_targets / torch.linalg.eigvalsh(gram)[-1])
