"""The one least-squares accumulator: a streaming QR factor of the rows (solved in :mod:`cropyield.solution`).

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
_F64 = torch.float64


class OneIntraOpThread:
    """Runs the accumulator's work on one intra-op thread, restoring the count after.

    Its operations are small (0.2-2 ms each per batch): on this project's shared 2-core machine,
    whenever another process held a core, two OpenMP threads made each one's median 10 to over 1,000
    times slower (it waits at a barrier for a thread that is not running) and the whole accumulator
    6-22 times; with both cores free they were at most twice as fast on the element-wise steps and no
    faster on the QR. Re-entrant and shared by threads (a count under a lock).
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
_WORKSPACES = threading.local()  # float64 work buffers per thread, reused by every update


def _workspace(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float64 work buffer of ``shape`` (its first dimension may be shorter than the buffer's),
    kept between updates: allocating and first touching 6 MB for every batch of 131,072 rows
    measured a tenth of the update, and far more where the allocator maps fresh pages each time."""
    buffer = getattr(_WORKSPACES, name, None)
    if buffer is None or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0] or buffer.device != device:
        buffer = torch.empty(shape, dtype=_F64, device=device)
        setattr(_WORKSPACES, name, buffer)
    return buffer[: shape[0]]


def _extremes(blocks: tuple[torch.Tensor, ...], work: torch.Tensor, n: int, data: list[int]) -> torch.Tensor:
    """``[2, data columns]``: each column's least and greatest value in ``blocks``, from the blocks
    where each of their columns is contiguous (half the bytes of ``work``, read in order: a third
    of the time), else from ``work``, ``[chunks, k, size]`` holding the ``n`` rows."""
    if all(block.stride(0) == 1 or len(block) == 1 for block in blocks):
        return torch.cat([torch.stack([block.amin(0), block.amax(0)]) for block in blocks], 1).to(_F64)
    full, rest = divmod(n, work.shape[2])
    if rest:  # the last chunk's unused rows, a copy of a row until they are zeroed
        work[full, :, rest:] = work[0, :, :1]
    return torch.stack([work.amin((0, 2)), work.amax((0, 2))])[:, data]


def _standardize_(rows: torch.Tensor, p: int, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """``(z - shift) / scale`` in place on the data columns of ``rows`` (``[..., columns, rows]``:
    ``p`` features, the column of ones, then targets); the column of ones is left as it is."""
    inverse = 1 / scale
    for first, last, at in ((0, p, 0), (p + 1, rows.shape[-2], p)):  # features, targets
        if first < last:
            columns = slice(at, at + last - first)
            rows[..., first:last, :].sub_(shift[columns, None]).mul_(inverse[columns, None])


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
        full, rest = divmod(n, size)
        # The rows as float64 columns [X, 1, Y] in chunks of `size` rows, each chunk a [size, k]
        # matrix in LAPACK's column-major layout, so that one call factors every chunk in place.
        work = self._chunks(blocks, n, size)  # [chunks, k, size]
        data = self.columns
        extremes = _extremes(blocks, work, n, data)  # the raw values'
        low, high = torch.minimum(self.low, extremes[0]), torch.maximum(self.high, extremes[1])
        shift, scale = self.shift, self.scale
        if float(self.count) == 0:
            # Summed down the rows of a row-major copy: summed in another order, the scale's last bit
            # moved and Wampler5's digits with it (6.2 to 5.9; its bound is 6).
            first = work.transpose(1, 2).reshape(-1, k)[:n, data]
            shift = first.mean(0) if center else torch.zeros_like(self.shift)
            if center:  # a column constant in the block is shifted to exactly 0 by its own value
                shift = torch.where(extremes[0] == extremes[1], first[0], shift)
            spread = (first - shift).square().mean(0).sqrt()
            scale = torch.where((spread > 0) & torch.isfinite(spread), spread, torch.ones_like(spread))
        _standardize_(work, p, shift, scale)
        if rest:
            work[full, :, rest:] = 0  # adds nothing to the factor
        chunks = work.transpose(1, 2)  # [chunks, size, k], column-major: factored in place
        tau = torch.empty(len(chunks), min(size, k), dtype=_F64, device=work.device)
        torch.geqrf(chunks, out=(chunks, tau))
        rs = chunks[:, : min(size, k)].triu()  # each chunk's R
        r = torch.linalg.qr(torch.cat([self.r, rs.reshape(-1, k)]), mode="r").R
        factor = QRFactor(p, self.count + n, shift, scale, r, low, high)
        before = int(self.count)
        if center and before and before.bit_length() < (before + n).bit_length():
            # Each time the rows double, the shift moves to the means so far: a first block unlike
            # the rest (sorted data) would otherwise cost digits (Wampler5 in batches of 8: 5.7 -> 6.1).
            factor = factor.recentred()
        return factor

    def _chunks(self, blocks: tuple[torch.Tensor, ...], n: int, size: int) -> torch.Tensor:
        """The work buffer ``[chunks, k, size]`` with the blocks' rows as float64 factor columns
        ``[X, 1, Y]``: chunk ``i`` holds rows ``i × size`` on (the last chunk's tail is left as it was)."""
        k = len(self.shift) + 1
        full, rest = divmod(n, size)
        work = _workspace("chunks", (full + (rest > 0), k, size), blocks[0].device)
        work[:, self.num_features] = 1
        for into, values in self._spans(blocks):  # converted and transposed in one pass
            if full:
                work[:full, into].copy_(values[: full * size].unflatten(0, (full, size)).transpose(1, 2))
            if rest:
                work[full, into, :rest].copy_(values[full * size :].T)
        return work

    def _spans(self, blocks: tuple[torch.Tensor, ...]):
        """Each run of the blocks' data columns with the factor columns it fills (past the column of
        ones): ``(slice of factor columns, values [rows, columns])``."""
        p, column = self.num_features, 0
        for block in blocks:
            width = block.shape[1]
            for lo, hi in ((column, min(column + width, p)), (max(column, p), column + width)):
                if lo < hi:
                    yield slice(lo + (lo >= p), hi + (lo >= p)), block[:, lo - column : hi - column]
            column += width

    def _copied(self, blocks: tuple[torch.Tensor, ...], length: int) -> torch.Tensor:
        """The work buffer ``[columns, length]`` with the blocks' rows (data columns from the first,
        at least the features) in its first columns, as float64 factor columns ``[X, 1, Y]``."""
        p, width = self.num_features, sum(block.shape[1] for block in blocks)
        work = _workspace("columns", (len(self.shift) + 1, length), blocks[0].device)[: width + 1]
        rows = work[:, : len(blocks[0])]
        rows[p] = 1
        for into, values in self._spans(blocks):  # converted and transposed in one pass
            rows[into].copy_(values.T)
        return work

    def scaled_columns(self, *blocks: torch.Tensor, origin: bool = False) -> torch.Tensor:
        """The blocks' rows (inputs, then optionally targets) as the factor's scaled columns,
        ``[X̃ | 1 | Ỹ]`` transposed: ``[columns, rows]`` float64, a view of a buffer the next call
        reuses. ``origin``: shifted by nothing (as :func:`solve` moves a fit through the origin)."""
        rows = self._copied(blocks, len(blocks[0]))
        width = rows.shape[0] - 1  # the data columns given
        shift = torch.zeros_like(self.shift) if origin else self.shift
        _standardize_(rows, self.num_features, shift[:width].to(rows), self.scale[:width].to(rows))
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
