"""The tutorial's from-scratch section with ``ManualSGDRegressor``, trained by the Trainer.

Run from the repository root:

    python scripts/from_scratch.py

Starts from the weights the tutorial printed (to 4 decimals) on its first 5 rows, in one full,
unshuffled batch, and prints the hand-written MSE before training, after one step of
``w -= w.grad * 1e-5``, and after 100 more epochs, as the tutorial does.
"""

import lightning as L
import torch

from cropyield import INPUTS, TARGETS, CropYieldDataModule, ManualSGDRegressor
from cropyield.callbacks import ProgressReport

# The tutorial's randomly drawn w and b, as it printed them.
TUTORIAL_W = torch.tensor([[1.0678, 1.5871, -0.6977], [1.1371, -0.7533, 0.0850]])
TUTORIAL_B = torch.tensor([1.4050, 1.3311])


def mse(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    diff = preds - targets
    return torch.sum(diff * diff) / diff.numel()


def train(model: ManualSGDRegressor, data: CropYieldDataModule, **limits) -> ProgressReport:
    report = ProgressReport(every_n_epochs=10, print_summary=False)
    trainer = L.Trainer(
        **limits,
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    trainer.fit(model, data)
    return report


def main() -> None:
    inputs, targets = INPUTS[:5], TARGETS[:5]
    model = ManualSGDRegressor()
    with torch.no_grad():
        model.linear.weight.copy_(TUTORIAL_W)
        model.linear.bias.copy_(TUTORIAL_B)
    data = CropYieldDataModule(limit_rows=5, batch_size=5, shuffle=False)

    def loss() -> float:
        with torch.no_grad():
            return mse(inputs @ model.linear.weight.t() + model.linear.bias, targets).item()

    print(f"Loss before training: {loss():.4f}")
    train(model, data, max_steps=1)
    print(f"Loss after one step:  {loss():.4f}")
    report = train(model, data, max_epochs=100)
    print(f"Loss after 100 more epochs: {loss():.4f}")
    print("Predictions beside targets (apples, oranges):")
    torch.set_printoptions(precision=4, sci_mode=False)
    with torch.no_grad():
        print(torch.cat([inputs @ model.linear.weight.t() + model.linear.bias, targets], dim=1))
    print(report.summary)


if __name__ == "__main__":
    main()
