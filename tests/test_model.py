"""Exactness against the tutorial's own loops, written here in plain PyTorch."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cropyield import INPUTS, TARGETS, CropYieldDataModule, CropYieldError, CropYieldRegressor, ManualSGDRegressor

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
        preds = inputs @ w.t() + b
        diff = preds - targets
        loss = torch.sum(diff * diff) / diff.numel()
        loss.backward()
        with torch.no_grad():
            w -= w.grad * 1e-5
            b -= b.grad * 1e-5
            w.grad.zero_()
            b.grad.zero_()
    return w.detach(), b.detach()


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
        "feature_names": ["feature_0", "feature_1", "feature_2", "feature_3"],
        "target_names": ["target_0"],
        "standardize": False,
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
