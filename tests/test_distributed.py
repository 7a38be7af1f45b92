"""Lightning's DDP strategy on two CPU processes, driven through the `cropyield` command."""

import json
import os
from pathlib import Path

import pytest
import torch

from cropyield import INPUTS

from .conftest import run

ROOT = Path(__file__).parents[1]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def ddp_fit(folder, *args, epochs=3):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = run("cropyield", "fit", *DDP, "--trainer.max_epochs", epochs,
                 "--trainer.callbacks+=tests.ddp_helpers.RecordRank", *args, cwd=folder, env=env)  # fmt: skip
    records = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return result, records, weights


@pytest.mark.slow
@pytest.mark.parametrize("fast_path", [False, True], ids=["dataloader", "fast_path"])
def test_ddp_on_two_cpu_processes(tmp_path, fast_path):
    args = ["--data.fast_path_min_rows", "8", "--data.batch_size", "4"] if fast_path else []
    result, records, weights = ddp_fit(tmp_path, *args)
    assert [r["world_size"] for r in records] == [2, 2]
    # Identical weights on both ranks: DDP averaged the gradients.
    for name in ("weight", "bias"):
        assert torch.equal(weights[0][name], weights[1][name])
    # Each checkpoint written once, by rank 0 only.
    assert records[1]["writes"] == []
    assert records[0]["writes"].count("last.ckpt") == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "last.ckpt"
    # Disjoint shards of equal size, covering the rows (up to the remainder under the fast path).
    seen = [{tuple(row) for row in r["rows"]} for r in records]
    assert len(records[0]["rows"]) == len(records[1]["rows"])
    all_rows = {tuple(row) for row in INPUTS.tolist()}
    if fast_path:
        assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 7 and seen[0] | seen[1] <= all_rows
    else:  # DistributedSampler pads 15 rows to 8 a rank with one repeated row
        assert seen[0] | seen[1] == all_rows and len(records[0]["rows"]) == 8
    assert "Final training MSE" in result.stdout
