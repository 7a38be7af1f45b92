"""A chunk's steps as one CUDA graph: bitwise the eager steps, with Lightning's step accounting kept.

On the CPU the graph's steps run eagerly on its static buffers (everything but the capture); the
``cuda`` cases capture and replay a real graph and run where a GPU is present.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cropyield import CropYieldDataModule, CropYieldRegressor, ManualSGDRegressor
from cropyield.errors import CropYieldWarning, TrainingDivergedError

from .test_model import hand_written_epochs, sgd_step, synthetic, tutorial_step

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
STEPS = {CropYieldRegressor: sgd_step, ManualSGDRegressor: tutorial_step}


def fit(quiet, cls, device, ckpt_path=None, model=None, lr=1e-5, **trainer_kwargs):
    """1000 rows, batches of 64 (16 an epoch, the last of 40 rows), chunks of 3 batches."""
    x, y = synthetic(1000, std=3.0, offset=20.0)
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=64, seed=5, fast_path_min_rows=100, steps_per_call=3)
    if model is None:
        torch.manual_seed(0)
        model = cls(lr=lr, cuda_graph=True)
    model._graph_devices = ("cuda", "cpu")  # on the CPU: the graph's steps, eagerly, on its buffers
    trainer = L.Trainer(**{**quiet, "accelerator": device, **trainer_kwargs})
    w0, b0 = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=True)
    return trainer, model, (x, y, w0, b0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [CropYieldRegressor, ManualSGDRegressor])
def test_graph_steps_equal_one_batch_per_step_by_hand(quiet, cls, device):
    trainer, model, (x, y, w0, b0) = fit(quiet, cls, device, max_epochs=2)
    w, b = hand_written_epochs(x, y, w0, b0, 2, 64, 5, STEPS[cls], device=device)
    assert torch.equal(model.linear.weight, w) and torch.equal(model.linear.bias, b)
    assert trainer.global_step == 2 * 16
    # Five full chunks an epoch went through the graph; the sixth (one batch of 40 rows) ran eagerly.
    assert model._graph.calls == 2 * 5
    assert (model._graph.graph is not None) == (device == "cuda")
    assert trainer.callback_metrics["train/loss"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_graph_steps_stop_exactly_at_max_steps_and_on_divergence(quiet, device):
    trainer, model, (x, y, w0, b0) = fit(quiet, CropYieldRegressor, device, max_steps=7)
    w, b = hand_written_epochs(x, y, w0, b0, 1, 64, 5, sgd_step, device=device, max_steps=7)
    assert trainer.global_step == 7 and model._graph.calls == 2  # 3 + 3 in the graph, the 7th eagerly
    assert torch.equal(model.linear.weight, w) and torch.equal(model.linear.bias, b)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch 1, step \d+: the loss is (inf|nan)"):
        fit(quiet, CropYieldRegressor, device, lr=1.0, max_epochs=3)


def test_graph_run_resumed_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_one(quiet, tmp_path):
    every = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=6, save_top_k=-1)
    trainer, model, (x, y, w0, b0) = fit(quiet, CropYieldRegressor, "cpu", max_epochs=2, callbacks=[every],
                                         enable_checkpointing=True)  # fmt: skip
    resumed = CropYieldRegressor(cuda_graph=True)
    again = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=6, save_top_k=-1)  # as when it was saved
    trainer, resumed, _ = fit(quiet, CropYieldRegressor, "cpu", tmp_path / "step=12.ckpt", resumed, max_epochs=2,
                              callbacks=[again], enable_checkpointing=True)  # fmt: skip
    w, b = hand_written_epochs(x, y, w0, b0, 2, 64, 5, sgd_step)
    for m in (model, resumed):
        assert torch.equal(m.linear.weight, w) and torch.equal(m.linear.bias, b)
    assert trainer.global_step == 32 and resumed._graph.calls == 1 + 5  # the rest of epoch 1, then epoch 2


def test_graph_that_cannot_apply_warns_and_runs_eagerly(quiet):
    x, y = synthetic(1000, std=3.0, offset=20.0)
    for steps_per_call, why in ((3, "training runs on cpu, not CUDA"), (1, "training_step gets one batch a call")):
        dm = CropYieldDataModule.from_tensors(
            x, y, batch_size=64, fast_path_min_rows=100, steps_per_call=steps_per_call
        )
        model = CropYieldRegressor(cuda_graph=True)
        with pytest.warns(CropYieldWarning, match=f"cuda_graph=True has no effect: {why}"):
            L.Trainer(max_steps=4, **quiet).fit(model, dm)
        assert model._graph is None
