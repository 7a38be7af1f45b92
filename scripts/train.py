"""The tutorial's built-ins section, trained by the Lightning Trainer.

Run from the repository root:

    python scripts/train.py

Seeds, trains ``nn.Linear(3, 2)`` with MSE and SGD(lr=1e-5) on shuffled batches of 5 for 100
epochs (printing the tutorial's progress lines), shows predictions beside targets, predicts the
yields of a new region (75, 63, 44), and saves ``checkpoints/train.ckpt``.
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from cropyield import INPUTS, TARGETS, CropYieldDataModule, CropYieldRegressor, predict
from cropyield.callbacks import ProgressReport
from cropyield.checkpoint_io import AtomicCheckpointIO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42, help="global seed (default: 42)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default: 100)")
    parser.add_argument("--root", default=".", help="folder for lightning_logs/ and checkpoints/ (default: .)")
    args = parser.parse_args()

    L.seed_everything(args.seed)
    model = CropYieldRegressor()
    report = ProgressReport(every_n_epochs=10, print_summary=False)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        default_root_dir=args.root,
        logger=CSVLogger(args.root),
        callbacks=[report],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, CropYieldDataModule())
    trainer.save_checkpoint(f"{args.root}/checkpoints/train.ckpt", weights_only=True)  # for inference

    torch.set_printoptions(precision=4, sci_mode=False)
    print("\nPredictions beside targets (apples, oranges):")
    print(torch.cat([predict(model, INPUTS), TARGETS], dim=1))
    apples, oranges = predict(model, [[75, 63, 44]])[0].tolist()
    print(
        f"\nA new region (temp 75, rainfall 63, humidity 44): apples {apples:.1f}, oranges {oranges:.1f} "
        "tons per hectare"
    )
    print(f"Checkpoint: {args.root}/checkpoints/train.ckpt")
    print(report.summary)


if __name__ == "__main__":
    main()
