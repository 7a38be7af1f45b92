"""Categorical columns and missing cells: treatment coding against statsmodels' formula OLS, raw rows
in on every prediction route, the readers, and the one-line errors."""

import csv
import importlib.util
import re
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import CropYieldDataModule, CropYieldError, LeastSquaresRegressor, load_regressor, predict
from cropyield.cells import read_cells
from cropyield.encoding import Coded, Encoding
from cropyield.files import data_files
from cropyield.pieces import list_pieces

from .conftest import assert_one_line_error, run

pd = pytest.importorskip("pandas")
smf = pytest.importorskip("statsmodels.formula.api")

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from make_data import make_crops, write_crops  # noqa: E402

TARGET = "hg/ha_yield"
NUMERIC = ["Year", "average_rain_fall_mm_per_year", "pesticides_tonnes", "avg_temp"]
FORMULA = "y ~ C(Area) + C(Item) + Year + rain + pest + avg_temp"
SHORT = {TARGET: "y", "average_rain_fall_mm_per_year": "rain", "pesticides_tonnes": "pest"}


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """6,000 crop-shaped rows, 8 areas, 4 crops (one of them "Rice, paddy"), 40 empty cells."""
    path = tmp_path_factory.mktemp("crops") / "yield.csv"
    write_crops(make_crops(6000, areas=8, crops=4, missing=40, seed=3), path)
    return path


def statsmodels_fit(path: Path):
    """statsmodels' formula OLS on the file as pandas reads it (rows with an empty cell dropped)."""
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""]).rename(columns=SHORT)
    return smf.ols(FORMULA, frame).fit(), frame


def our_name(statsmodels_name: str) -> str:
    """``C(Item)[T.Potatoes]`` is ``Item[T.Potatoes]`` here."""
    return re.sub(r"^C\((\w+)\)", r"\1", {"rain": "average_rain_fall_mm_per_year", "pest": "pesticides_tonnes"}.get(
        statsmodels_name, statsmodels_name))  # fmt: skip


def exact_fit(tmp_path, quiet, **data) -> tuple[LeastSquaresRegressor, CropYieldDataModule, Path]:
    dm = CropYieldDataModule(target_names=[TARGET], missing="drop", batch_size=1000, **data)
    model = LeastSquaresRegressor(in_features=dm.num_features, out_features=1, feature_names=dm.feature_names,
                                  target_names=[TARGET])  # fmt: skip
    options = {**quiet, "enable_checkpointing": True, "default_root_dir": tmp_path}
    trainer = L.Trainer(max_epochs=1, **options)
    trainer.fit(model, dm)
    ckpt = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, dm, ckpt


def test_encoding_is_treatment_coding_with_sorted_levels():
    encoding = Encoding(("Item", "rain"), {"Item": ("Maize", "Potatoes", "Rice, paddy")})
    assert encoding.feature_names == ("Item[T.Potatoes]", "Item[T.Rice, paddy]", "rain")
    column = Coded.of(["Rice, paddy", "Maize", "Potatoes", "Maize"])
    table, keep, counts = encoding.encode({"Item": column, "rain": np.array([1.0, 2.0, 3.0, 4.0])})
    expected = [[0, 1, 1], [0, 0, 2], [1, 0, 3], [0, 0, 4]]  # Maize, the first level, is the reference
    assert table.tolist() == expected and keep is None and counts == {}
    assert encoding.numeric.tolist() == [False, False, True]
    assert Encoding.from_dict(encoding.to_dict()) == encoding
    years = Coded.of([2001, 1999.0, "2000"])  # numbers as levels: one text each, sorted as numbers
    from cropyield.encoding import sort_levels

    assert sort_levels(years.present()) == ["1999", "2000", "2001"]


def test_exact_fit_in_memory_equals_statsmodels_formula_ols(crops, tmp_path, quiet, capsys):
    reference, frame = statsmodels_fit(crops)
    model, dm, ckpt = exact_fit(tmp_path, quiet, data_path=str(crops))
    kept = frame.dropna()
    assert len(kept) == 6000 - 40
    missing = frame.rename(columns={v: k for k, v in SHORT.items()}).isna().sum()
    per_column = ", ".join(f"{c} {n}" for c, n in missing.items() if n)
    assert f"dropped 40 of 6,000 rows with a missing value: {per_column}" in capsys.readouterr().out
    # Every coefficient, by name, and the predictions of the same rows.
    weights = dict(zip(dm.feature_names, model.solution.weight[0].tolist(), strict=True))
    assert len(weights) == len(reference.params) - 1
    for name, value in reference.params.items():
        ours = float(model.solution.bias[0]) if name == "Intercept" else weights[our_name(name)]
        assert ours == pytest.approx(value, rel=1e-6, abs=1e-6 * abs(reference.params["Intercept"]))
    loaded = load_regressor(ckpt)
    raw = pd.read_csv(crops, keep_default_na=False, na_values=[""]).loc[kept.index].drop(columns=[TARGET])
    preds = predict(loaded, raw.to_dict("records"))[:, 0].double().numpy()
    np.testing.assert_allclose(preds, reference.fittedvalues.to_numpy(), rtol=0, atol=1e-5 * kept["y"].abs().mean())
    # The checkpoint records the raw columns and every level as plain lists: it loads with weights_only.
    saved = torch.load(ckpt, weights_only=True)["cropyield"]["encoding"]
    assert saved["columns"] == ["Area", "Item", *NUMERIC]
    assert saved["levels"]["Item"] == sorted(set(kept["Item"])) and "Rice, paddy" in saved["levels"]["Item"]
    assert saved["levels"]["Area"] == sorted(set(kept["Area"])) and len(saved["levels"]["Area"]) == 8


def test_streamed_folder_one_file_per_crop_equals_statsmodels(crops, tmp_path, quiet):
    reference, frame = statsmodels_fit(crops)
    folder = tmp_path / "by_crop"
    table = pd.read_csv(crops, keep_default_na=False, na_values=[""], dtype={"Year": "Int64"})
    for k, (_, part) in enumerate(table.dropna(subset=["Item"]).groupby("Item")):
        columns = {c: [None if pd.isna(v) else v for v in part[c]] for c in part.columns}
        write_crops(columns, folder / f"crop-{k}.{'parquet' if k % 2 else 'csv'}")  # CSV and Parquet pieces
    for streaming in (True, False):
        model, dm, _ = exact_fit(tmp_path / str(streaming), quiet, data_path=str(folder), streaming=streaming)
        kept = frame.dropna()
        # Rows in another order (by crop): compare the fits' predictions on the same rows.
        raw = kept.rename(columns={v: k for k, v in SHORT.items()})[list(dm.input_names)]
        x = torch.from_numpy(Encoding.from_dict(model.encoding).encode_rows(raw.to_dict("records")))
        preds = (x.double() @ model.solution.weight.T + model.solution.bias)[:, 0].numpy()
        np.testing.assert_allclose(preds, reference.fittedvalues.to_numpy(), rtol=0, atol=1e-5 * kept["y"].abs().mean())


def test_standardize_scales_numeric_columns_and_leaves_dummies(crops):
    dm = CropYieldDataModule(data_path=str(crops), target_names=[TARGET], missing="drop", standardize=True)
    dm.setup("fit")
    kept = pd.read_csv(crops, keep_default_na=False, na_values=[""]).dropna()
    numeric = dm.encoding.numeric
    assert not numeric[: len(dm.feature_names) - 4].any() and numeric[-4:].all()
    assert (
        dm.feature_mean[~torch.from_numpy(numeric)].eq(0).all()
        and dm.feature_std[~torch.from_numpy(numeric)].eq(1).all()
    )
    np.testing.assert_allclose(dm.feature_mean[-4:].numpy(), kept[NUMERIC].mean().to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(dm.feature_std[-4:].numpy(), kept[NUMERIC].std(ddof=0).to_numpy(), rtol=1e-4)
    x, _ = dm.training_rows()
    assert set(x[:, :-4].unique().tolist()) == {0.0, 1.0}


@pytest.mark.slow
def test_sgd_with_fast_yaml_settings_reaches_r2_above_095(crops, tmp_path):
    args = ["--data.data_path", crops, "--data.target_names", f"[{TARGET}]", "--data.missing", "drop"]
    result = run("cropyield", "fit", "--config", "fast.yaml", *args, "--data.fast_path_min_rows", "1000", cwd=tmp_path)
    model = load_regressor(tmp_path / "checkpoints" / "last.ckpt")
    assert model.hparams.standardize and model.hparams.lr == 0.5 and "dropped 40 of 6,000 rows" in result.stdout
    kept = pd.read_csv(crops, keep_default_na=False, na_values=[""]).dropna()
    preds = predict(model, kept.drop(columns=[TARGET]).to_dict("records"))[:, 0].double().numpy()
    y = kept[TARGET].to_numpy()
    r2 = 1 - ((preds - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert r2 > 0.95, r2


def test_an_unseen_level_is_an_error_on_every_route(crops, tmp_path, quiet):
    _, _, ckpt = exact_fit(tmp_path, quiet, data_path=str(crops))
    model = load_regressor(ckpt)
    row = {"Area": "Peru", "Item": "Oats", "Year": 2000, "average_rain_fall_mm_per_year": 900.0,
           "pesticides_tonnes": 100.0, "avg_temp": 20.0}  # fmt: skip
    good = {**row, "Item": "Rice, paddy"}
    with pytest.raises(CropYieldError, match=r"row 1, column 'Item': level 'Oats' was not in the training data"):
        predict(model, [good, row])
    values = ["Peru", "Rice, paddy", "2000", "900", "100", "20"]
    result = run("cropyield-predict", "--ckpt", ckpt, *values, "--json", cwd=tmp_path)
    assert json_of(result.stdout)[0][TARGET] == pytest.approx(float(predict(model, [good])[0, 0]), rel=1e-6)
    result = run("cropyield-predict", "--ckpt", ckpt, *values[:1], "Oats", *values[2:], cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "cropyield-predict: error:", "column 'Item'", "'Oats'", "row 0")
    with pytest.raises(CropYieldError, match="row 0, column 'avg_temp': missing value"):
        predict(model, [{**good, "avg_temp": None}])
    with open(tmp_path / "new.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(row)
        writer.writerows([[*good.values()], [*[*good.values()][:-1], ""]])
    result = run("cropyield-predict", "--ckpt", ckpt, "--csv", tmp_path / "new.csv", cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "new.csv, row 2, column 'avg_temp': missing value")


def json_of(text: str):
    import json

    return json.loads(text)


def test_exports_take_raw_rows(crops, tmp_path, quiet):
    from cropyield.export import JsonPredictor, export_json

    _, _, ckpt = exact_fit(tmp_path, quiet, data_path=str(crops))
    model = load_regressor(ckpt)
    rows = pd.read_csv(crops, keep_default_na=False, na_values=[""]).dropna().head(50).drop(columns=[TARGET])
    expected = predict(model, rows.to_dict("records")).numpy()
    json_model = JsonPredictor.load(export_json(ckpt, tmp_path / "m.json"))
    np.testing.assert_allclose(json_model.predict(rows.to_dict("records")), expected, rtol=1e-5)
    with pytest.raises(CropYieldError, match="level 'Oats'"):
        json_model.predict([{**rows.iloc[0].to_dict(), "Item": "Oats"}])
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return
    import onnxruntime

    from cropyield.export import export_onnx

    session = onnxruntime.InferenceSession(str(export_onnx(ckpt, tmp_path / "m.onnx")))
    feed = {c: rows[[c]].to_numpy().astype(object if c in ("Area", "Item") else np.float32) for c in rows.columns}
    np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-5, atol=1e-2)
    feed["Item"] = rows[["Item"]].to_numpy().astype(object)
    feed["Item"][7, 0] = "Oats"  # onnxruntime's own error: it names the node (the column), not the value or row
    with pytest.raises(Exception, match=r"OneHotEncoder node\. Name:'Item' Status Message: Unknown Category"):
        session.run(None, feed)


def test_an_id_column_is_refused_by_max_levels(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("plot,rain,y\n" + "".join(f"P{i:04d},{i % 7},{i % 5}\n" for i in range(1200)))
    dm = CropYieldDataModule(data_path=str(path), target_names=["y"])
    assert dm.categorical_names == ("plot",)
    with pytest.raises(CropYieldError, match=r"column 'plot': 1,200 distinct values, more than max_levels=1,000"):
        _ = dm.feature_names
    assert len(CropYieldDataModule(data_path=str(path), target_names=["y"], max_levels=2000).feature_names) == 1200


def test_missing_cells_are_an_error_by_default(crops, tmp_path):
    with pytest.raises(CropYieldError, match=r"yield\.csv, row \d+, column '\w+': missing value"):
        CropYieldDataModule(data_path=str(crops), target_names=[TARGET]).setup("fit")
    result = run("cropyield", "fit", "--data.data_path", crops, "--data.target_names", f"[{TARGET}]", cwd=tmp_path,
                 check_rc=None)  # fmt: skip
    assert_one_line_error(result, "cropyield: error:", "yield.csv, row", "missing value")


def test_a_numeric_column_can_be_categorical_and_levels_come_from_training_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("Year,x,y\n" + "".join(f"{1990 + i % 3},{i},{2 * i + i % 3}\n" for i in range(30)))
    dm = CropYieldDataModule(data_path=str(path), target_names=["y"], categorical_names=["Year"])
    assert dm.feature_names == ("Year[T.1991]", "Year[T.1992]", "x") and dm.input_names == ("Year", "x")
    assert CropYieldDataModule(data_path=str(path), target_names=["y"]).feature_names == ("Year", "x")


def test_a_quoted_value_is_one_cell_on_every_reader(tmp_path, monkeypatch):
    rows = [["Rice, paddy", 1.5, 2.0], ['He said "hi"\nthen left', 2.5, 3.0], ["Maize", 3.5, 4.0]] * 200
    path = tmp_path / "q.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["Item", "x", "y"], *rows])
    expected = [r[0] for r in rows]

    def values(source):
        columns, _ = read_cells(source, ["x", "y"], ["Item"])
        item = columns["Item"]
        assert columns["x"].tolist() == [r[1] for r in rows][: len(item)]
        return [item.keys[c] for c in item.codes]

    assert values(path) == expected  # pyarrow (quoted newlines go to the exact parser)
    pieces = list_pieces(data_files(path), ["x", "y"], csv_block_bytes=512)  # blocks cut between records only
    assert len(pieces) > 10 and sum(p.rows for p in pieces) == len(rows)
    assert [v for p in pieces for v in values(p)] == expected
    monkeypatch.setattr("cropyield.cells._pyarrow", lambda: None)  # the standard library's reader
    assert values(path) == expected


def test_cli_predict_and_validate_from_a_checkpoint_use_its_levels(crops, tmp_path):
    args = ["--data.target_names", f"[{TARGET}]", "--data.missing", "drop"]
    run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", crops, *args, cwd=tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    table = pd.read_csv(crops, keep_default_na=False, na_values=[""]).dropna()
    few = table[table["Item"].isin(["Potatoes", "Wheat"])].head(40)  # two of the four crops: fewer levels
    few.to_csv(tmp_path / "few.csv", index=False)
    run("cropyield", "predict", "--ckpt_path", ckpt, "--data.data_path", "few.csv", cwd=tmp_path)
    written = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    inputs = [c for c in few.columns if c != TARGET]
    assert list(written.columns) == [*inputs, TARGET]  # the raw columns, not Item[T.Potatoes] ...
    assert written["Item"].tolist() == few["Item"].tolist() and written["Area"].tolist() == few["Area"].tolist()
    for name in NUMERIC:  # the values the model read (float32), written so that they read back to them
        assert written[name].to_numpy(np.float32).tolist() == few[name].to_numpy(np.float32).tolist(), name
    expected = predict(load_regressor(ckpt), few.drop(columns=[TARGET]).to_dict("records"))[:, 0].numpy()
    np.testing.assert_allclose(written[TARGET].to_numpy(), expected, rtol=1e-6)
    few.assign(Item="Oats").to_csv(tmp_path / "oats.csv", index=False)
    result = run("cropyield", "predict", "--ckpt_path", ckpt, "--data.data_path", "oats.csv", cwd=tmp_path,
                 check_rc=None)  # fmt: skip
    assert_one_line_error(result, "oats.csv, row 1, column 'Item': level 'Oats' was not in the training data")
    result = run("cropyield", "validate", "--ckpt_path", ckpt, "--data.data_path", "few.csv", cwd=tmp_path)
    assert re.search(r"val/r2\s+0\.99", result.stdout), result.stdout


def test_the_prediction_writer_writes_the_raw_columns_of_a_model_not_trained_yet(tmp_path, quiet):
    from cropyield import CropYieldRegressor
    from cropyield.callbacks import CSVPredictionWriter

    path = tmp_path / "d.csv"
    items = ["b", '"a, c"']
    path.write_text("Item,x,y\n" + "".join(f"{items[i % 2]},{i / 4},{i % 3}\n" for i in range(6)))
    dm = CropYieldDataModule(data_path=str(path), target_names=["y"])
    model = CropYieldRegressor(in_features=None, out_features=1, target_names=["y"])  # sized in setup
    trainer = L.Trainer(callbacks=[CSVPredictionWriter(str(tmp_path / "p.csv"))], **quiet)
    preds = torch.cat(trainer.predict(model, dm))
    with open(tmp_path / "p.csv", newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == ["Item", "x", "y"] and model.hparams.feature_names == ["Item[T.b]", "x"]
    assert [row[:2] for row in written[1:]] == [[["b", "a, c"][i % 2], str(i / 4).removesuffix(".0")] for i in range(6)]
    assert [float(row[2]) for row in written[1:]] == preds[:, 0].tolist()


def test_given_levels_are_used_as_given(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("Item,x,y\n" + "".join(f"{'ab'[i % 2]},{i},{i % 3}\n" for i in range(20)))
    dm = CropYieldDataModule(data_path=str(path), target_names=["y"], levels={"Item": ["b", "a", "c"]})
    assert dm.feature_names == ("Item[T.a]", "Item[T.c]", "x")  # b, given first, is the reference
    dm.setup("fit")
    x, _ = dm.training_rows()
    assert x[:, 0].tolist() == [float(i % 2 == 0) for i in range(20)] and x[:, 1].eq(0).all()
    with pytest.raises(CropYieldError, match="level 'a' was not in the training data"):
        CropYieldDataModule(data_path=str(path), target_names=["y"], levels={"Item": ["b"]}).setup("fit")


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streamed"])
def test_a_categorical_fit_resumed_with_ckpt_path_last_equals_an_uninterrupted_run(tmp_path, caplog, streaming):
    from cropyield.cli import cli_main

    path = tmp_path / "crops.csv"
    write_crops(make_crops(400, areas=4, crops=3, missing=10, seed=5), path)
    args = ["--config", "fast.yaml", "--data.data_path", str(path), "--data.target_names", f"[{TARGET}]",
            "--data.missing", "drop", "--data.val_fraction", "0.2", "--data.batch_size", "40",
            "--data.streaming", str(streaming).lower(), "--trainer.enable_progress_bar", "false"]  # fmt: skip

    def fit(folder: str, epochs: int, *more: str) -> Path:
        cli_main(["fit", *args, "--trainer.default_root_dir", str(tmp_path / folder), "--trainer.max_epochs",
                  str(epochs), *more])  # fmt: skip
        return tmp_path / folder / "checkpoints" / "last.ckpt"

    whole = fit("whole", 6)
    assert torch.load(fit("resumed", 3), weights_only=True)["epoch"] == 2
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        resumed = fit("resumed", 6, "--ckpt_path", "last")
    assert "Restored all states" in caplog.text  # resumed, not started over (which would also match)
    a, b = load_regressor(whole), load_regressor(resumed)
    assert a.encoding == b.encoding and len(a.hparams.feature_names) == 3 + 2 + 4  # Area, Item dummies
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert torch.equal(a.feature_mean, b.feature_mean) and torch.equal(a.feature_std, b.feature_std)


def test_a_model_without_in_features_is_sized_by_the_streamed_data_in_setup(crops, tmp_path, quiet):
    sized, dm, _ = exact_fit(tmp_path, quiet, data_path=str(crops), streaming=True)  # sized before the Trainer
    lazy = LeastSquaresRegressor(in_features=None, out_features=1, target_names=[TARGET])
    later = CropYieldDataModule(data_path=str(crops), target_names=[TARGET], missing="drop", batch_size=1000,
                                streaming=True)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, **quiet)
    trainer.fit(lazy, later)  # the levels learned in the data module's setup, the layer built in the model's
    assert lazy.hparams.in_features == dm.num_features and lazy.hparams.feature_names == list(dm.feature_names)
    assert torch.equal(lazy.linear.weight, sized.linear.weight) and torch.equal(lazy.linear.bias, sized.linear.bias)
    trainer.save_checkpoint(tmp_path / "lazy.ckpt")
    loaded = load_regressor(tmp_path / "lazy.ckpt")
    assert loaded.encoding == sized.encoding and torch.equal(loaded.linear.weight, sized.linear.weight)
