"""Lightning's DDP strategy on two CPU processes, driven through the `cropyield` command."""

import json
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import (
    FEATURE_NAMES,
    INPUTS,
    TARGET_NAMES,
    CropYieldDataModule,
    LeastSquaresRegressor,
    load_regressor,
    predict,
)
from cropyield.files import read_table

from .conftest import run, write_csv

COLUMNS = (*FEATURE_NAMES, *TARGET_NAMES)

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


@pytest.mark.slow
def test_exact_solver_under_ddp_reads_every_row_once_and_matches_statsmodels(tmp_path, quiet):
    import statsmodels.api as sm

    from .test_exact import assert_matches, assert_same_summary, expected_summary

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1001, 3, generator=g) * 10 + 50  # an odd count: the ranks' shares differ
    y = x @ torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]).T + torch.randn(1001, 2, generator=g) * x[:, :1] / 50
    write_csv(tmp_path / "d.csv", ["temp", "rainfall", "humidity", "apples", "oranges"], torch.cat([x, y], 1).tolist())
    # The exact solver reads the CSV text in float64: so does the reference.
    table = read_table(tmp_path / "d.csv", list(COLUMNS), dtype=np.float64)
    x, y = (torch.from_numpy(t) for t in np.split(table, [3], axis=1))
    args = ["--config", "exact.yaml", "--data.data_path", "d.csv", "--data.batch_size", "64",
            "--model.init_args.cov_type", "HC1"]  # fmt: skip
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "d.csv").write_bytes((tmp_path / "d.csv").read_bytes())
    result, records, weights = ddp_fit(tmp_path / "ddp", *args, epochs=1)
    seen = [[tuple(row) for row in r["rows"]] for r in records]
    assert len(seen[0]) + len(seen[1]) == 1001 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(map(tuple, x.tolist()))
    for name in ("weight", "bias"):
        assert torch.equal(weights[0][name], weights[1][name])
    ddp = load_regressor(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    design = np.c_[x.numpy(), np.ones(1001)]
    solution = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(ddp.solution.weight.numpy(), solution[:3].T, rtol=1e-11)
    np.testing.assert_allclose(ddp.linear.weight.detach().numpy(), solution[:3].T, rtol=2**-23)
    optimum = ((design @ solution - y.numpy()) ** 2).mean()
    final = re.search(
        r"Final training MSE: ([\d.]+) \(least-squares optimum on the same rows: ([\d.]+)\)",
        result.stdout,
    )
    assert final[1] == final[2] == f"{optimum:.4f}"
    # Its statistics, from the 2-process passes (the HC pass too), are statsmodels' on all the rows.
    summary = json.loads(run("cropyield-report", "--ckpt", "checkpoints/last.ckpt", "--summary", "--json",
                             cwd=tmp_path / "ddp").stdout)  # fmt: skip
    assert_matches(summary, expected_summary(x, y, "HC1"), rel=1e-9)
    assert sm  # statsmodels computed the reference above
    # The one-process in-memory fit of the same file: the same summary to rounding.
    dm = CropYieldDataModule(data_path=tmp_path / "d.csv", batch_size=64, shuffle=False)
    in_memory = LeastSquaresRegressor(feature_names=FEATURE_NAMES, target_names=TARGET_NAMES, cov_type="HC1")
    L.Trainer(max_epochs=1, **quiet).fit(in_memory, dm)
    assert_same_summary(summary, in_memory.summary().to_dict())


@pytest.mark.slow
def test_streamed_folder_under_ddp_reads_disjoint_shares(tmp_path):
    from .test_streaming import write_folder

    rows = write_folder(tmp_path / "d", sizes=(700, 1300, 2000), row_group=250)
    common = ["--data.data_path", tmp_path / "d", "--data.streaming", "true", "--data.shuffle_buffer", "300"]
    for exact in (False, True):
        folder = tmp_path / ("exact" if exact else "sgd")
        folder.mkdir()
        args = [*common, "--data.batch_size", "50"]
        args += ["--config", "exact.yaml"] if exact else ["--data.standardize", "true", "--model.lr", "0.05"]
        result, records, weights = ddp_fit(folder, *args, epochs=1 if exact else 2)
        ids = [[row[0] for row in r["rows"]] for r in records]
        assert len(records[0]["rows"]) == len(records[1]["rows"]) or exact
        assert not set(ids[0]) & set(ids[1])
        for name in ("weight", "bias"):
            assert torch.equal(weights[0][name], weights[1][name])
        if exact:  # every row exactly once across the two processes, and statsmodels' fit of them
            assert sorted(ids[0] + ids[1]) == rows[:, 0].tolist()
            design = np.c_[np.ones(len(rows)), rows[:, :3]]
            solution = np.linalg.lstsq(design, rows[:, 3:], rcond=None)[0]
            optimum = ((design @ solution - rows[:, 3:]) ** 2).mean()
            assert f"Final training MSE: {optimum:.4f} (least-squares optimum on the same rows: {optimum:.4f})" in (
                result.stdout
            )
            fitted = load_regressor(folder / "checkpoints" / "last.ckpt")
            np.testing.assert_allclose(fitted.solution.weight.numpy(), solution[1:].T, rtol=1e-11)
        else:  # the same number of rows each; what is left out is less than a piece
            assert len(ids[0]) == len(ids[1]) and len(rows) - 2 * len(ids[0]) < 250 + 2


@pytest.mark.slow
def test_streamed_folder_one_file_per_crop_under_ddp_equals_statsmodels(tmp_path):
    from .test_encoding import TARGET, make_crops, statsmodels_fit, write_crops

    pd = pytest.importorskip("pandas")
    crops = tmp_path / "yield.csv"
    write_crops(make_crops(6000, areas=8, crops=4, missing=40, seed=5), crops)
    reference, frame = statsmodels_fit(crops)
    table = pd.read_csv(crops, keep_default_na=False, na_values=[""], dtype={"Year": "Int64"})
    folder = tmp_path / "run" / "by_crop"
    # One file per crop (a row whose crop is empty goes with the first): each process reads two crops.
    for k, (_, part) in enumerate(table.groupby(table["Item"].fillna("Maize"))):
        write_crops({c: [None if pd.isna(v) else v for v in part[c]] for c in part.columns}, folder / f"crop-{k}.csv")
    args = ["--config", "exact.yaml", "--data.data_path", "by_crop", "--data.streaming", "true",
            "--data.target_names", f"[{TARGET}]", "--data.missing", "drop", "--data.batch_size", "500"]  # fmt: skip
    result, records, weights = ddp_fit(tmp_path / "run", *args, epochs=1)
    # The encoded rows: 7 area columns, then the 3 crop columns (Maize, the reference, has none).
    crops_seen = [{row[7:10].index(1.0) + 1 if 1.0 in row[7:10] else 0 for row in r["rows"]} for r in records]
    assert all(len(seen) < 4 for seen in crops_seen)  # no process read every crop
    # Learning the levels, each process read only its share of the files, and encodes every crop.
    assert [r["first_pass"] for r in records] == [["crop-0.csv", "crop-2.csv"], ["crop-1.csv", "crop-3.csv"]]
    for name in ("weight", "bias"):
        assert torch.equal(weights[0][name], weights[1][name])
    missing = frame.isna().sum()
    assert result.stdout.count("dropped 40 of 6,000 rows with a missing value:") == 1
    assert f"avg_temp {missing['avg_temp']}" in result.stdout or not missing["avg_temp"]
    model = load_regressor(tmp_path / "run" / "checkpoints" / "last.ckpt")
    kept = frame.dropna()
    raw = table.loc[kept.index].drop(columns=[TARGET])
    raw["Year"] = raw["Year"].astype(int)
    preds = predict(model, raw.to_dict("records"))[:, 0].double().numpy()
    np.testing.assert_allclose(preds, reference.fittedvalues.to_numpy(), rtol=0, atol=1e-5 * kept["y"].abs().mean())


@pytest.mark.slow
def test_rows_dropped_for_a_missing_cell_are_counted_over_the_processes(tmp_path):
    from .test_encoding import TARGET, make_crops, write_crops

    columns = make_crops(3000, missing=30, seed=7)
    columns = {k: v for k, v in columns.items() if k not in ("Area", "Item")}  # numbers only: no levels to learn
    folder = tmp_path / "d"
    for k in range(4):  # four files: each process reads two in the first pass
        write_crops({c: v[k * 750 : (k + 1) * 750] for c, v in columns.items()}, folder / f"part-{k}.csv")
    missing = {c: sum(v is None for v in values) for c, values in columns.items()}
    dropped = sum(any(columns[c][i] is None for c in columns) for i in range(3000))
    args = ["--data.data_path", "d", "--data.streaming", "true", "--data.target_names", f"[{TARGET}]",
            "--data.missing", "drop", "--data.batch_size", "100", "--data.standardize", "true"]  # fmt: skip
    result, records, _ = ddp_fit(tmp_path, *args, epochs=1)
    per_column = ", ".join(f"{c} {n}" for c, n in missing.items() if n)
    line = f"dropped {dropped} of 3,000 rows with a missing value: {per_column}"
    assert result.stdout.count(line) == 1, result.stdout
    assert sum(len(r["rows"]) for r in records) <= 3000 - dropped


def test_streamed_sgd_under_ddp_ends_with_the_report_of_every_rows_optimum(tmp_path):
    """The closing report's statistics pass gathers across processes: every rank must enter it."""
    from .test_streaming import write_folder

    rows = write_folder(tmp_path / "d", sizes=(10_000, 7_000, 3_500), row_group=2_500).astype(np.float64)
    args = ["--data.data_path", tmp_path / "d", "--data.streaming", "true", "--data.batch_size", "500"]
    result, _, weights = ddp_fit(tmp_path, *args, "--model.lr", "1e-9", epochs=1)
    for name in ("weight", "bias"):
        assert torch.equal(weights[0][name], weights[1][name])
    design = np.c_[rows[:, :3], np.ones(len(rows))]
    solution = np.linalg.lstsq(design, rows[:, 3:], rcond=None)[0]
    optimum = ((design @ solution - rows[:, 3:]) ** 2).mean()
    assert re.search(rf"\(least-squares optimum on the same rows: {optimum:.4f}\)$", result.stdout, re.M), result.stdout
