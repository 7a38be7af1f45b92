"""JSON and ONNX exports hold the checkpoint's tensors and reproduce its predictions."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import INPUTS, CropYieldDataModule, CropYieldRegressor
from cropyield.export import JsonPredictor, export_json, export_onnx

from .conftest import assert_one_line_error, run
from .test_routes import reference


@pytest.fixture(params=[False, True], ids=["raw", "standardized"])
def checkpoint(request, tmp_path, quiet):
    L.seed_everything(0, verbose=False)
    model = CropYieldRegressor(standardize=request.param, lr=0.1 if request.param else 1e-5)
    trainer = L.Trainer(max_epochs=5, **quiet)
    trainer.fit(model, CropYieldDataModule(standardize=request.param))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


ROWS = np.concatenate([INPUTS.numpy(), [[75, 63, 44], [0, 0, 0], [200, 10, 90]]]).astype(np.float32)


def saved_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weight, bias and scaler as an export must hold them (the identity scaler,
    zeros and ones, for a model that does not standardize)."""
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["state_dict"]
    tensors = {"weight": state["linear.weight"], "bias": state["linear.bias"]}
    if saved["hyper_parameters"]["standardize"]:
        tensors |= {"feature_mean": state["feature_mean"], "feature_std": state["feature_std"]}
    else:
        tensors |= {"feature_mean": torch.zeros(3), "feature_std": torch.ones(3)}
    return tensors


def assert_predicts_what_the_checkpoint_holds(got: np.ndarray, checkpoint, rows: np.ndarray) -> None:
    expected, bound = reference(checkpoint, torch.from_numpy(rows))  # float64, from the tensors alone
    error = (torch.from_numpy(got).double() - expected).abs()
    assert got.dtype == np.float32 and got.shape == (len(rows), 2) and (error <= bound).all(), (error / bound).max()


def test_json_export_holds_the_checkpoints_tensors_and_predicts_with_numpy_alone(checkpoint, tmp_path):
    export_json(checkpoint, tmp_path / "m.json")
    spec = json.loads((tmp_path / "m.json").read_text())
    assert spec["feature_names"] == ["temp", "rainfall", "humidity"] and spec["target_names"] == ["apples", "oranges"]
    for name, tensor in saved_tensors(checkpoint).items():  # every float32 digit, through the JSON text
        assert torch.equal(torch.tensor(spec[name], dtype=torch.float32), tensor), name
    predictor = JsonPredictor.load(tmp_path / "m.json")
    assert_predicts_what_the_checkpoint_holds(predictor.predict(ROWS), checkpoint, ROWS)


def test_onnx_graph_holds_the_checkpoints_tensors(checkpoint, tmp_path):
    import onnx
    from onnx import numpy_helper

    export_onnx(checkpoint, tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [node.op_type for node in graph.node] == ["Sub", "Div", "Gemm"]
    held = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    expected = saved_tensors(checkpoint)
    assert sorted(held) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(held[name], tensor), name


@pytest.mark.parametrize("batch", [1, 7, 18])
def test_onnx_export_runs_in_onnxruntime_for_any_batch_size(checkpoint, tmp_path, batch):
    import onnxruntime as ort

    export_onnx(checkpoint, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {"features": ROWS[:batch]})[0]
    assert_predicts_what_the_checkpoint_holds(got, checkpoint, ROWS[:batch])


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
