"""The closed-form references, checked against independent computations written here."""

import numpy as np
import torch

from cropyield import INPUTS, TARGETS
from cropyield.reference import QRFactor
from cropyield.solution import least_squares, max_stable_lr, solve


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


def _loss(params: torch.Tensor) -> torch.Tensor:
    w, b = params[:6].reshape(2, 3), params[6:]
    return ((INPUTS.double() @ w.T + b - TARGETS.double()) ** 2).mean()


def test_max_stable_lr_is_two_over_the_hessians_largest_eigenvalue():
    hessian = torch.autograd.functional.hessian(_loss, torch.zeros(8, dtype=torch.float64))
    expected = 2 / torch.linalg.eigvalsh(hessian)[-1].item()
    bound = max_stable_lr(QRFactor.of(torch.cat([INPUTS, TARGETS], 1), 3))
    assert abs(bound - expected) < 1e-9 * expected
    assert 1.0e-4 < bound < 1.2e-4  # "about 1.1e-4 on the tutorial's raw inputs"


def test_full_batch_gradient_descent_diverges_just_above_the_bound_only():
    bound = max_stable_lr(QRFactor.of(torch.cat([INPUTS, TARGETS], 1), 3))
    for factor, diverges in ((0.95, False), (1.05, True)):
        params = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        for _ in range(3000):
            (grad,) = torch.autograd.grad(_loss(params), params)
            with torch.no_grad():
                params -= factor * bound * grad
        assert (_loss(params).item() > 1e6) == diverges, factor


def test_factors_merged_in_any_grouping_give_the_whole_tables_cross_products():
    rows = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0)).double() * 3 + 50
    design = torch.cat([rows[:, :3], torch.ones(1000, 1, dtype=torch.float64), rows[:, 3:]], 1)  # [X | 1 | Y]
    gram = design.T @ design
    for sizes in ([1000], [1, 999], [500, 0, 500], [7] * 142 + [6]):
        parts = [QRFactor.of(part, 3) for part in rows.split(sizes)]
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        streamed = QRFactor.empty(3, 2)
        for part in rows.split(sizes):
            streamed = streamed.update(part[:, :3], part[:, 3:])
        for factor in (merged, streamed):
            assert float(factor.count) == 1000
            # RᵀR is the Gram matrix of the shifted, scaled columns: undo the shift and scale.
            t = torch.eye(6, dtype=torch.float64)
            cols = [0, 1, 2, 4, 5]
            t[cols, cols] = factor.scale
            t[3, cols] = factor.shift
            rebuilt = (factor.r @ t).T @ (factor.r @ t)
            torch.testing.assert_close(rebuilt, gram, rtol=1e-12, atol=0)


def test_factor_gives_the_mse_r2_and_feature_statistics_of_the_rows():
    w, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    factor = QRFactor.of(torch.cat([INPUTS, TARGETS], 1), 3)
    residual = INPUTS.double() @ w.T + b - TARGETS.double()
    torch.testing.assert_close(factor.mse(w, b), (residual**2).mean(0), rtol=1e-12, atol=0)
    y = TARGETS.double()
    r2 = 1 - (residual**2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(factor.r2(w, b), r2, rtol=1e-12, atol=1e-12)
    mean, std = factor.feature_scale()
    torch.testing.assert_close(mean, INPUTS.double().mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(std, INPUTS.double().std(0, correction=0), rtol=1e-13, atol=0)


def test_scaled_factor_is_the_factor_of_the_scaled_rows():
    factor = QRFactor.of(torch.cat([INPUTS, TARGETS], 1), 3)
    mean, std = INPUTS.double().mean(0), INPUTS.double().std(0, correction=0)
    scaled = torch.cat([(INPUTS.double() - mean) / std, TARGETS.double()], 1)
    fit = solve(factor.scaled(mean, std))
    design = torch.cat([scaled[:, :3], torch.ones(15, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(design, scaled[:, 3:], driver="gelsd").solution
    torch.testing.assert_close(fit.weight, expected[:3].T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fit.bias, expected[3], rtol=1e-12, atol=0)


def test_fit_through_the_origin_matches_lstsq_without_a_column_of_ones():
    fit = least_squares(INPUTS, TARGETS, fit_intercept=False)
    expected = torch.linalg.lstsq(INPUTS.double(), TARGETS.double(), driver="gelsd").solution
    torch.testing.assert_close(fit.weight, expected.T, rtol=1e-12, atol=0)
    assert torch.equal(fit.bias, torch.zeros(2, dtype=torch.float64))
    residual = INPUTS.double() @ expected - TARGETS.double()
    torch.testing.assert_close(fit.rss, (residual**2).sum(0), rtol=1e-11, atol=0)
    torch.testing.assert_close(fit.tss, (TARGETS.double() ** 2).sum(0), rtol=1e-13, atol=0)  # uncentred


def test_ridge_matches_its_closed_form():
    x, y = INPUTS.double().numpy(), TARGETS.double().numpy()
    xc, yc = x - x.mean(0), y - y.mean(0)
    for alpha in (0.5, 10.0, 1e4):
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(3), xc.T @ yc).T  # [2, 3]
        b = y.mean(0) - w @ x.mean(0)
        fit = least_squares(INPUTS, TARGETS, l2=alpha)
        np.testing.assert_allclose(fit.weight.numpy(), w, rtol=1e-10)
        np.testing.assert_allclose(fit.bias.numpy(), b, rtol=1e-10)
        assert fit.problems is None


def test_singular_data_gives_the_minimum_norm_solution_and_names_the_columns():
    x = torch.cat([INPUTS, INPUTS[:, :1], torch.full((15, 1), 7.0)], 1)  # a duplicate, a constant
    fit = solve(QRFactor.of(torch.cat([x, TARGETS], 1), 5), feature_names=["t", "r", "h", "t2", "c"])
    xc = x.double().numpy() - x.double().numpy().mean(0)
    yc = TARGETS.double().numpy() - TARGETS.double().numpy().mean(0)
    expected = np.linalg.lstsq(xc, yc, rcond=None)[0].T  # minimum-norm, the intercept apart
    np.testing.assert_allclose(fit.weight.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()
    assert "constant column(s) ['c']" in fit.problems and "collinear column(s) ['t', 't2']" in fit.problems
    few = least_squares(INPUTS[:3], TARGETS[:3])
    assert few.problems == "only 3 rows for 3 features" and torch.isfinite(few.weight).all()
