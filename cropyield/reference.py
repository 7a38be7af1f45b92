"""Plain-PyTorch references: the least-squares optimum and SGD's largest stable step size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK = 1 << 20  # rows per chunk: keeps float64 work memory small on millions of rows


@dataclass(frozen=True)
class LeastSquares:
    """The ordinary-least-squares fit: ``targets ≈ inputs @ weight.T + bias``, in float64."""

    weight: torch.Tensor
    bias: torch.Tensor
    mse: float


def least_squares(inputs: torch.Tensor, targets: torch.Tensor) -> LeastSquares:
    """Solves ordinary least squares in float64 and returns the weights, bias and optimal MSE.

    Centred normal equations accumulated in chunks, so millions of rows need little memory.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
        >>> y = (x[:, :1] * 1 + x[:, 1:] * 2 + 3)
        >>> fit = least_squares(x, y)
        >>> fit.weight.round(decimals=6).tolist(), fit.bias.round(decimals=6).tolist(), round(fit.mse, 9)
        ([[1.0, 2.0]], [3.0], 0.0)
    """
    n = len(inputs)
    x_mean = sum(c.double().sum(0) for c in inputs.split(_CHUNK)) / n
    y_mean = sum(c.double().sum(0) for c in targets.split(_CHUNK)) / n
    xx = torch.zeros(inputs.shape[1], inputs.shape[1], dtype=torch.float64, device=inputs.device)
    xy = torch.zeros(inputs.shape[1], targets.shape[1], dtype=torch.float64, device=inputs.device)
    for xc, yc in zip(inputs.split(_CHUNK), targets.split(_CHUNK), strict=True):
        xc, yc = xc.double() - x_mean, yc.double() - y_mean
        xx += xc.T @ xc
        xy += xc.T @ yc
    weight = torch.linalg.lstsq(xx, xy).solution.T
    bias = y_mean - weight @ x_mean
    return LeastSquares(weight, bias, mse_of(inputs, targets, weight, bias))


def mse_of(inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """The mean squared error of ``inputs @ weight.T + bias`` against ``targets``, summed in float64."""
    total = 0.0
    for xc, yc in zip(inputs.split(_CHUNK), targets.split(_CHUNK), strict=True):
        diff = xc.double() @ weight.double().T + bias.double() - yc.double()
        total += float((diff * diff).sum())
    return total / targets.numel()


def max_stable_lr(inputs: torch.Tensor, num_targets: int) -> float:
    """The largest stable full-batch SGD step on the MSE loss: 2 / the Hessian's largest eigenvalue.

    For ``mean((x̃ W̃ᵀ - y)²)`` over ``n`` rows and ``t`` targets (``x̃`` = inputs with a 1 for the
    bias), the Hessian has eigenvalues ``2 λ(x̃ᵀx̃) / (n t)``, so the bound is ``n t / λmax(x̃ᵀx̃)``.
    """
    n = len(inputs)
    gram = torch.zeros(inputs.shape[1] + 1, inputs.shape[1] + 1, dtype=torch.float64, device=inputs.device)
    for xc in inputs.split(_CHUNK):
        xc = torch.cat([xc.double(), torch.ones(len(xc), 1, dtype=torch.float64, device=xc.device)], dim=1)
        gram += xc.T @ xc
    return n * num_targets / float(torch.linalg.eigvalsh(gram)[-1])
