"""The closed-form references, checked against independent computations written here."""

import torch

from cropyield import INPUTS, TARGETS
from cropyield.reference import least_squares, max_stable_lr, mse_of


def test_least_squares_recovers_a_known_linear_model():
    # scikit-learn's example: y = 1 * x0 + 2 * x1 + 3
    x = torch.tensor([[1.0, 1.0], [1.0, 2.0], [2.0, 2.0], [2.0, 3.0]])
    y = (x @ torch.tensor([1.0, 2.0]) + 3).unsqueeze(1)
    fit = least_squares(x, y)
    torch.testing.assert_close(fit.weight, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(fit.bias, torch.tensor([3.0], dtype=torch.float64))
    assert fit.mse < 1e-20


def test_least_squares_on_the_tutorial_data_matches_lstsq():
    fit = least_squares(INPUTS, TARGETS)
    design = torch.cat([INPUTS.double(), torch.ones(15, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, TARGETS.double(), driver="gelsd").solution  # [4, 2]
    torch.testing.assert_close(fit.weight, solution[:3].T, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(fit.bias, solution[3], rtol=1e-8, atol=1e-9)
    optimum = ((design @ solution - TARGETS.double()) ** 2).mean().item()
    assert abs(fit.mse - optimum) < 1e-9 and abs(fit.mse - 0.909) < 1e-3


def test_mse_of_is_the_mean_squared_error():
    w, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    expected = ((INPUTS.double() @ w.T + b - TARGETS.double()) ** 2).mean().item()
    assert abs(mse_of(INPUTS, TARGETS, w, b) - expected) < 1e-9 * expected


def _loss(params: torch.Tensor) -> torch.Tensor:
    w, b = params[:6].reshape(2, 3), params[6:]
    return ((INPUTS.double() @ w.T + b - TARGETS.double()) ** 2).mean()


def test_max_stable_lr_is_two_over_the_hessians_largest_eigenvalue():
    hessian = torch.autograd.functional.hessian(_loss, torch.zeros(8, dtype=torch.float64))
    expected = 2 / torch.linalg.eigvalsh(hessian)[-1].item()
    bound = max_stable_lr(INPUTS, 2)
    assert abs(bound - expected) < 1e-9 * expected
    assert 1.0e-4 < bound < 1.2e-4  # "about 1.1e-4 on the tutorial's raw inputs"


def test_full_batch_gradient_descent_diverges_just_above_the_bound_only():
    bound = max_stable_lr(INPUTS, 2)
    for factor, diverges in ((0.95, False), (1.05, True)):
        params = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        for _ in range(3000):
            (grad,) = torch.autograd.grad(_loss(params), params)
            with torch.no_grad():
                params -= factor * bound * grad
        assert (_loss(params).item() > 1e6) == diverges, factor
