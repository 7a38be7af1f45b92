"""The ``cropyield-report`` command: a PNG of a run's training loss and predicted vs actual yields,
or the statistics table of an exact least-squares checkpoint.

    cropyield-report --log-dir . --ckpt checkpoints/last.ckpt --out report.png
    cropyield-report --ckpt checkpoints/last.ckpt --summary [--json] [--alpha 0.05]

matplotlib comes with the ``report`` extra: ``pip install 'cropyield[report]'``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cropyield.errors import CropYieldError
from cropyield.inference import LinearPredictor, predict


def find_run(log_dir: str | Path) -> Path:
    """The folder holding ``metrics.csv``: ``log_dir`` itself, or its newest ``version_N``
    (looked for in ``log_dir`` and in ``log_dir/lightning_logs``)."""
    log_dir = Path(log_dir)
    if (log_dir / "metrics.csv").is_file():
        return log_dir
    for parent in (log_dir / "lightning_logs", log_dir):
        versions = [p for p in parent.glob("version_*") if (p / "metrics.csv").is_file()]
        if versions:
            return max(versions, key=lambda p: int(re.sub(r"\D", "", p.name) or -1))
    raise CropYieldError(f"{log_dir}: no metrics.csv here, nor in a version_N folder or lightning_logs/version_N")


def epoch_losses(run: Path) -> tuple[list[int], list[float]]:
    """The logged ``train/loss`` (the mean over each epoch's batches), by epoch."""
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    if not rows:
        raise CropYieldError(f"{run / 'metrics.csv'}: no train/loss values logged")
    return [int(r["epoch"]) + 1 for r in rows], [float(r["train/loss"]) for r in rows]


def evaluation_rows(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation rows, rebuilt from its saved ``config.yaml`` (the embedded data if none)."""
    from cropyield.data import CropYieldDataModule

    kwargs = {}
    if (run / "config.yaml").is_file():
        import yaml

        data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
        accepted = inspect.signature(CropYieldDataModule).parameters
        kwargs = {k: v for k, v in data.items() if k in accepted}
    dm = CropYieldDataModule(**kwargs)
    dm.setup("validate")
    rows = torch.cat([torch.cat(batch, dim=1) for batch in dm.val_dataloader()])
    return rows[:, : dm.num_features], rows[:, dm.num_features :]


def draw(run: Path, ckpt: Path, out: Path, dpi: int = 100) -> Path:
    """Draws the report: loss per epoch (log scale), then predicted vs actual for each target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CropYieldError("the report needs matplotlib; install it with: pip install 'cropyield[report]'") from None
    epochs, losses = epoch_losses(run)
    model = LinearPredictor.from_checkpoint(ckpt)
    inputs, targets = evaluation_rows(run)
    preds = predict(model, inputs)
    count = len(model.target_names)
    fig, axes = plt.subplots(1, 1 + count, figsize=(4.5 * (1 + count), 4.2), dpi=dpi, squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, losses, marker=".", lw=1)
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss (MSE, mean over the epoch)", title="Training loss")
    ax.grid(True, which="both", alpha=0.3)
    for j, name in enumerate(model.target_names):
        ax = axes[0, 1 + j]
        actual, predicted = targets[:, j].numpy(), preds[:, j].numpy()
        low, high = min(actual.min(), predicted.min()), max(actual.max(), predicted.max())
        ax.plot([low, high], [low, high], color="grey", lw=1, ls="--", label="y = x")
        ax.scatter(actual, predicted, s=18, alpha=0.8)
        mse = float(((predicted - actual) ** 2).mean())
        ax.set(xlabel=f"actual {name}", ylabel=f"predicted {name}", title=f"{name}: MSE {mse:.2f}")
        ax.legend(loc="upper left")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{run} — {ckpt.name}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def summary_text(ckpt: Path, alpha: float = 0.05, as_json: bool = False) -> str:
    """The statistics of an exact least-squares checkpoint: the table, or ``to_dict()`` as JSON.

    Raises:
        CropYieldError: the checkpoint is not an exact ordinary least-squares fit (SGD, ridge, singular data).
    """
    from cropyield.inference import _exact_state, _spec, read_checkpoint
    from cropyield.summary import RegressionSummary

    checkpoint = read_checkpoint(ckpt)
    variant, _, _ = _spec(ckpt, checkpoint)
    state = _exact_state(checkpoint)
    if variant != "LeastSquaresRegressor" or state is None:
        raise CropYieldError(
            f"{ckpt}: a {variant} checkpoint has no least-squares statistics (trained by SGD); fit with "
            "--config exact.yaml for standard errors"
        )
    summary = RegressionSummary.of(state, alpha)
    return json.dumps(summary.to_dict(), indent=2) if as_json else str(summary)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``cropyield-report``: errors are one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="cropyield-report",
        description="Draw a run's training loss per epoch and predicted vs actual yields into a PNG, or print an "
        "exact fit's statistics (--summary).",
    )
    parser.add_argument(
        "--log-dir", help="the run's default_root_dir (its newest run is used) or one version folder (for the PNG)"
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint whose predictions to plot or statistics to print")
    parser.add_argument("--out", default="report.png", help="PNG file to write (default: report.png)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default: 100)")
    parser.add_argument("--summary", action="store_true", help="print the exact fit's statistics table instead")
    parser.add_argument("--json", action="store_true", help="with --summary: print its numbers as JSON")
    parser.add_argument("--alpha", type=float, default=0.05, help="with --summary: 1 - the intervals' level")
    args = parser.parse_args(argv)
    if not args.summary and args.log_dir is None:
        parser.error("--log-dir is required (unless --summary)")
    try:
        if args.summary:
            print(summary_text(Path(args.ckpt), args.alpha, args.json))
            return
        path = draw(find_run(args.log_dir), Path(args.ckpt), Path(args.out), args.dpi)
    except CropYieldError as err:
        print(f"cropyield-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")
