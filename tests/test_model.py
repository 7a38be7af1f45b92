"""Exactness against the tutorial's own loops, written here in plain PyTorch."""

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cropyield import (
    INPUTS,
    TARGETS,
    CropYieldDataModule,
    CropYieldError,
    CropYieldRegressor,
    LeastSquaresRegressor,
    ManualSGDRegressor,
    load_regressor,
)
from cropyield.batches import Chunks
from cropyield.errors import CropYieldWarning, TrainingDivergedError

W0 = torch.tensor([[1.0678, 1.5871, -0.6977], [1.1371, -0.7533, 0.0850]])
B0 = torch.tensor([1.4050, 1.3311])


def tutorial_builtins(seed: int, epochs: int = 100) -> nn.Linear:
    """The tutorial's second half, verbatim: nn.Linear, shuffled DataLoader of 5, SGD(1e-5), F.mse_loss."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    train_dl = DataLoader(TensorDataset(INPUTS, TARGETS), 5, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    for _ in range(epochs):
        for xb, yb in train_dl:
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model


def tutorial_from_scratch(w: torch.Tensor, b: torch.Tensor, epochs: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's first half, verbatim: the hand-written model, MSE and update on its 5 rows."""
    inputs, targets = INPUTS[:5], TARGETS[:5]
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    for _ in range(epochs):
        tutorial_step(w, b, inputs, targets)
    return w.detach(), b.detach()


def tutorial_step(w, b, xb, yb):
    """The tutorial's hand-written step, verbatim: predictions, MSE, backward, update, zero."""
    preds = xb @ w.t() + b
    diff = preds - yb
    loss = torch.sum(diff * diff) / diff.numel()
    loss.backward()
    with torch.no_grad():
        w -= w.grad * 1e-5
        b -= b.grad * 1e-5
        w.grad.zero_()
        b.grad.zero_()


@pytest.mark.parametrize("seed", [0, 7, 42, 2024])
def test_regressor_trainer_fit_equals_tutorial_loop(seed, quiet):
    L.seed_everything(seed, verbose=False)
    model = CropYieldRegressor()
    L.Trainer(max_epochs=100, **quiet).fit(model, CropYieldDataModule())
    reference = tutorial_builtins(seed)
    assert torch.equal(model.linear.weight, reference.weight)
    assert torch.equal(model.linear.bias, reference.bias)


def test_manual_variant_equals_hand_written_loop_and_counts_steps(quiet):
    model = ManualSGDRegressor()
    with torch.no_grad():
        model.linear.weight.copy_(W0)
        model.linear.bias.copy_(B0)
    trainer = L.Trainer(max_epochs=100, **quiet)
    trainer.fit(model, CropYieldDataModule(limit_rows=5, batch_size=5, shuffle=False))
    w, b = tutorial_from_scratch(W0, B0)
    assert torch.equal(model.linear.weight, w)
    assert torch.equal(model.linear.bias, b)
    assert trainer.global_step == 100


def test_manual_variant_respects_max_steps(quiet):
    trainer = L.Trainer(max_steps=7, **quiet)
    trainer.fit(ManualSGDRegressor(), CropYieldDataModule(batch_size=5, shuffle=False))
    assert trainer.global_step == 7  # 3 batches an epoch: stopped inside the third epoch


def test_variants_agree_from_same_weights_over_same_batches(quiet):
    results = []
    for cls in (CropYieldRegressor, ManualSGDRegressor):
        model = cls()
        with torch.no_grad():
            model.linear.weight.copy_(W0)
            model.linear.bias.copy_(B0)
        L.Trainer(max_epochs=100, **quiet).fit(model, CropYieldDataModule(shuffle=False))
        results.append(torch.cat([model.linear.weight.flatten(), model.linear.bias]))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)
    assert not torch.equal(results[0], torch.cat([W0.flatten(), B0]))  # it did train


@pytest.mark.parametrize("cls", [CropYieldRegressor, ManualSGDRegressor])
def test_fit_lowers_loss_and_logs_validation_mse_of_the_rows(cls, quiet):
    L.seed_everything(3, verbose=False)
    model = cls()
    with torch.no_grad():
        before = F.mse_loss(model(INPUTS), TARGETS)
    trainer = L.Trainer(max_epochs=20, **quiet)
    trainer.fit(model, CropYieldDataModule())
    with torch.no_grad():
        after = F.mse_loss(model(INPUTS), TARGETS)
    assert after < before / 10
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["val/mse"], after, rtol=1e-6, atol=0)
    per_target = ((model(INPUTS) - TARGETS) ** 2).mean(0).detach()
    torch.testing.assert_close(logged["val/mse_apples"], per_target[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(logged["val/mse_oranges"], per_target[1], rtol=1e-6, atol=0)
    mae = (model(INPUTS) - TARGETS).abs().mean().detach()
    torch.testing.assert_close(logged["val/mae"], mae, rtol=1e-6, atol=0)
    residual = ((TARGETS - model(INPUTS).detach()) ** 2).sum(0)
    r2 = 1 - residual / ((TARGETS - TARGETS.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(logged["val/r2"], r2.mean(), rtol=1e-5, atol=1e-6)


def test_test_stage_logs_per_target_metrics(quiet):
    model = CropYieldRegressor()
    results = L.Trainer(**quiet).test(model, CropYieldDataModule(), verbose=False)[0]
    assert {"test/mse", "test/mae", "test/r2", "test/r2_apples", "test/mae_oranges"} <= set(results)


def test_predict_step_accepts_pairs_and_bare_inputs():
    model = CropYieldRegressor().eval()
    with torch.no_grad():
        expected = model(INPUTS)
        assert torch.equal(model.predict_step((INPUTS, TARGETS), 0), expected)
        assert torch.equal(model.predict_step(INPUTS, 0), expected)


def test_hyperparameters_are_plain_values_and_linear_is_the_only_parameter_module(tmp_path, quiet):
    model = ManualSGDRegressor(in_features=4, out_features=1, lr=1e-3)
    assert [name for name, _ in model.named_parameters()] == ["linear.weight", "linear.bias"]
    assert dict(model.hparams) == {
        "in_features": 4,
        "out_features": 1,
        "lr": 1e-3,
        "cuda_graph": False,
        "feature_names": ["feature_0", "feature_1", "feature_2", "feature_3"],
        "target_names": ["target_0"],
        "standardize": False,
        "units": None,
    }
    trainer = L.Trainer(max_epochs=1, **quiet)
    dm = CropYieldDataModule.from_tensors(torch.rand(10, 4), torch.rand(10, 1))
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert checkpoint["cropyield"]["class"] == "ManualSGDRegressor"
    assert set(checkpoint["state_dict"]) >= {"linear.weight", "linear.bias", "feature_mean", "feature_std"}


def test_linear_is_created_first_so_initial_weights_match_the_tutorial():
    torch.manual_seed(11)
    reference = nn.Linear(3, 2)
    torch.manual_seed(11)
    model = CropYieldRegressor()
    assert torch.equal(model.linear.weight, reference.weight) and torch.equal(model.linear.bias, reference.bias)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr must be positive"), ({"in_features": 2, "feature_names": ["a"]}, "do not match")],
)
def test_regressor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(CropYieldError, match=message):
        CropYieldRegressor(**kwargs)


# --- the exact solver ---------------------------------------------------------------------------


def lstsq_optimum(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """An independent float64 reference: numpy's lstsq on [x, 1]."""
    design = np.c_[x.double().numpy(), np.ones(len(x))]
    solution = np.linalg.lstsq(design, y.double().numpy(), rcond=None)[0]
    return solution[:-1].T, solution[-1], float(((design @ solution - y.double().numpy()) ** 2).mean())


def saved_mse(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """The MSE, summed in float64, of the model's float32 weights as saved."""
    w, b = model.linear.weight.detach().double().numpy(), model.linear.bias.detach().double().numpy()
    if model.hparams.standardize:
        mean, std = model.feature_mean.double().numpy(), model.feature_std.double().numpy()
        w, b = w / std, b - (w / std) @ mean
    return float(((x.double().numpy() @ w.T + b - y.double().numpy()) ** 2).mean())


def fit_exact(x, y, quiet, tmp_path=None, epochs=1, **kwargs):
    standardize = kwargs.pop("standardize", False)
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=kwargs.pop("batch_size", 65536), standardize=standardize)
    model = LeastSquaresRegressor(x.shape[1], y.shape[1], standardize=standardize, **kwargs)
    trainer = L.Trainer(max_epochs=epochs, **quiet)
    trainer.fit(model, dm)
    if tmp_path is not None:
        trainer.save_checkpoint(tmp_path / "exact.ckpt")
        model = load_regressor(tmp_path / "exact.ckpt")
    return model, trainer


def synthetic(rows: int, offset: float = 0.0, std: float = 10.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 3, generator=g, dtype=torch.float64) * std + offset).float()
    w = torch.tensor([[0.7, -1.2, 0.4], [0.3, 0.9, -0.5]], dtype=torch.float64)
    y = (x.double() @ w.T + torch.tensor([5.0, -3.0]) + torch.randn(rows, 2, generator=g, dtype=torch.float64)).float()
    return x, y


@pytest.mark.parametrize(
    ("case", "standardize"),
    [("tutorial", False), ("tutorial", True), ("1e6 rows", False), ("offset 1e4, std 1", False),
     ("offset 1e4, std 1", True)],
)  # fmt: skip
def test_exact_fit_reaches_the_float64_optimum(case, standardize, quiet, tmp_path):
    x, y = {
        "tutorial": (INPUTS, TARGETS),
        "1e6 rows": synthetic(1_000_000),
        "offset 1e4, std 1": synthetic(200_000, offset=1e4, std=1.0),
    }[case]
    weight, _, optimum = lstsq_optimum(x, y)
    model, _ = fit_exact(x, y, quiet, tmp_path, standardize=standardize)
    assert isinstance(model, LeastSquaresRegressor)
    # The docs claim float64 accuracy: the saved float32 weights within float32 rounding of the optimum
    # (scikit-learn's float32 answer misses it by 1.3e-9 relative, and its weights by 3e-4).
    # Storing the bias in float32 moves every prediction by up to half its ulp (|b| 2^-24): that much more.
    rounding = float((model.linear.bias.detach().double().abs() * 2**-24).square().max()) / optimum
    excess = saved_mse(model, x, y) / optimum - 1
    assert -1e-13 <= excess < 1e-11 + rounding, (excess, rounding)
    solution = model.solution.weight.numpy()
    if standardize:  # solved on the inputs scaled by the stored (float32) statistics
        solution = solution / model.feature_std.double().numpy()
    else:
        np.testing.assert_allclose(model.linear.weight.detach().numpy(), weight, rtol=2**-23, atol=0)
    np.testing.assert_allclose(solution, weight, rtol=1e-9, atol=0)


def test_exact_fit_in_memory_logs_and_recomputes_the_same_answer(quiet):
    model, trainer = fit_exact(INPUTS, TARGETS, quiet, epochs=3, batch_size=4)
    _, _, optimum = lstsq_optimum(INPUTS, TARGETS)
    assert abs(model.solution.mse - optimum) < 1e-9 * optimum
    assert trainer.global_step == 3 * 4  # batches counted as steps: 15 rows in batches of 4, 3 epochs
    once, _ = fit_exact(INPUTS, TARGETS, quiet, epochs=1, batch_size=4)
    assert torch.equal(once.linear.weight, model.linear.weight) and torch.equal(once.linear.bias, model.linear.bias)
    assert abs(float(trainer.callback_metrics["train/loss"]) - optimum) < 1e-7 * optimum  # logged as float32
    torch.testing.assert_close(trainer.callback_metrics["val/mse"].double(), torch.tensor(optimum, dtype=torch.float64),
                               rtol=1e-5, atol=0)  # fmt: skip


def test_exact_fit_ridge_matches_the_closed_form(quiet):
    x, y = INPUTS.double().numpy(), TARGETS.double().numpy()
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + 100.0 * np.eye(3), xc.T @ yc).T
    model, _ = fit_exact(INPUTS, TARGETS, quiet, l2=100.0)
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(), y.mean(0) - w @ x.mean(0), rtol=1e-5)


def test_exact_fit_on_a_duplicated_column_warns_and_stays_finite(quiet):
    x = torch.cat([INPUTS, INPUTS[:, 1:2]], 1)
    with pytest.warns(CropYieldWarning, match=r"collinear column\(s\) \['feature_1', 'feature_3'\].*minimum-norm"):
        model, _ = fit_exact(x, TARGETS, quiet)
    w = model.linear.weight.detach()
    assert torch.isfinite(w).all() and torch.isfinite(model.linear.bias).all()
    torch.testing.assert_close(w[:, 1], w[:, 3])  # the minimum-norm solution splits the weight evenly
    _, _, optimum = lstsq_optimum(x, TARGETS)
    assert saved_mse(model, x, TARGETS) / optimum - 1 < 1e-6


def test_exact_regressor_rejects_a_negative_penalty():
    with pytest.raises(CropYieldError, match="l2 must be zero or positive"):
        LeastSquaresRegressor(l2=-1.0)


# --- several optimizer steps per training_step --------------------------------------------------


def hand_written_epochs(
    x, y, w, b, epochs: int, batch: int, seed: int, step, device: str = "cpu", max_steps: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path's batches by hand: one permutation per epoch seeded by (seed + epoch), one
    index_select per batch; ``step(w, b, xb, yb)`` updates w and b in place (at most ``max_steps``)."""
    rows = torch.cat([x, y], 1).to(device)
    w, b = w.to(device).clone().requires_grad_(), b.to(device).clone().requires_grad_()
    steps = 0
    for epoch in range(epochs):
        generator = torch.Generator(device).manual_seed(seed + epoch)
        for idx in torch.randperm(len(rows), generator=generator, device=device).split(batch):
            if steps == max_steps:
                break
            chunk = rows.index_select(0, idx)
            step(w, b, chunk[:, :3], chunk[:, 3:])
            steps += 1
    return w.detach(), b.detach()


def sgd_step(w, b, xb, yb):
    """The tutorial's built-ins step: F.mse_loss, backward, SGD(lr=1e-5).step(), zero_grad."""
    opt = torch.optim.SGD([w, b], lr=1e-5)  # stateless without momentum: a new one each step is the same
    loss = F.mse_loss(xb @ w.T + b, yb)
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("steps_per_call", [None, 3, 1])
@pytest.mark.parametrize("cls", [CropYieldRegressor, ManualSGDRegressor])
def test_chunked_steps_equal_one_batch_per_step_by_hand(quiet, cls, steps_per_call):
    x, y = synthetic(1000, std=3.0, offset=20.0)
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=64, seed=5, fast_path_min_rows=100,
                                          steps_per_call=steps_per_call)  # fmt: skip
    torch.manual_seed(0)
    model = cls()
    w0, b0 = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    trainer = L.Trainer(max_epochs=2, **quiet)
    trainer.fit(model, dm)
    w, b = hand_written_epochs(x, y, w0, b0, 2, 64, 5, sgd_step if cls is CropYieldRegressor else tutorial_step)
    assert torch.equal(model.linear.weight, w) and torch.equal(model.linear.bias, b)
    assert trainer.global_step == 2 * 16  # ceil(1000 / 64) batches an epoch, each one step
    chunked = steps_per_call != 1
    assert isinstance(trainer.train_dataloader, Chunks) == chunked
    assert model.automatic_optimization == (cls is CropYieldRegressor and not chunked)
    logged = float(trainer.callback_metrics["train/loss"])  # the epoch's mean loss over its rows
    assert logged > 0 and math.isfinite(logged)


def test_chunked_steps_stop_exactly_at_max_steps_and_on_divergence(quiet):
    x, y = synthetic(1000, std=3.0, offset=20.0)

    def data():
        return CropYieldDataModule.from_tensors(x, y, batch_size=64, fast_path_min_rows=100, steps_per_call=4)

    trainer = L.Trainer(max_steps=7, **quiet)
    trainer.fit(CropYieldRegressor(), data())
    assert trainer.global_step == 7
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch 1, step \d+: the loss is (inf|nan)"):
        L.Trainer(max_epochs=3, **quiet).fit(CropYieldRegressor(lr=1.0), data())
