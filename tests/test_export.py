"""JSON and ONNX exports reproduce the checkpoint's predictions."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import INPUTS, CropYieldDataModule, CropYieldRegressor, load_regressor
from cropyield.export import JsonPredictor, export_json, export_onnx

from .conftest import assert_one_line_error, run


@pytest.fixture(params=[False, True], ids=["raw", "standardized"])
def checkpoint(request, tmp_path, quiet):
    L.seed_everything(0, verbose=False)
    model = CropYieldRegressor(standardize=request.param, lr=0.1 if request.param else 1e-5)
    trainer = L.Trainer(max_epochs=5, **quiet)
    trainer.fit(model, CropYieldDataModule(standardize=request.param))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


def expected(checkpoint, rows):
    with torch.no_grad():
        return load_regressor(checkpoint)(torch.as_tensor(rows, dtype=torch.float32)).numpy()


ROWS = np.concatenate([INPUTS.numpy(), [[75, 63, 44], [0, 0, 0], [200, 10, 90]]]).astype(np.float32)


def test_json_export_predicts_with_numpy_alone(checkpoint, tmp_path):
    export_json(checkpoint, tmp_path / "m.json")
    spec = json.loads((tmp_path / "m.json").read_text())
    assert spec["feature_names"] == ["temp", "rainfall", "humidity"] and spec["target_names"] == ["apples", "oranges"]
    predictor = JsonPredictor.load(tmp_path / "m.json")
    np.testing.assert_allclose(predictor.predict(ROWS), expected(checkpoint, ROWS), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, 18])
def test_onnx_export_runs_in_onnxruntime_for_any_batch_size(checkpoint, tmp_path, batch):
    ort = pytest.importorskip("onnxruntime")
    export_onnx(checkpoint, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {"features": ROWS[:batch]})[0]
    np.testing.assert_allclose(got, expected(checkpoint, ROWS[:batch]), atol=1e-4, rtol=1e-6)


def test_export_command_and_its_errors(checkpoint, tmp_path):
    for fmt in ("json", "onnx"):
        result = run("cropyield-export", "--ckpt", checkpoint, "--format", fmt, "--out", f"m.{fmt}", cwd=tmp_path)
        assert f"wrote m.{fmt}" in result.stdout and (tmp_path / f"m.{fmt}").stat().st_size > 0
    (tmp_path / "junk.ckpt").write_text("junk")
    result = run(
        "cropyield-export", "--ckpt", "junk.ckpt", "--format", "json", "--out", "x.json", cwd=tmp_path, check_rc=None
    )
    assert_one_line_error(result, "cropyield-export: error:", "junk.ckpt")
    assert not (tmp_path / "x.json").exists()
