"""Export a checkpoint for use outside PyTorch, and the numpy-only predictor that reads the JSON.

    cropyield-export --ckpt checkpoints/last.ckpt --format json --out model.json
    cropyield-export --ckpt checkpoints/last.ckpt --format onnx --out model.onnx

JSON holds the weights, bias, scaler and feature/target names; :class:`JsonPredictor` needs only
numpy. ONNX (the ``onnx`` extra) is a graph ``(x - mean) / std`` then ``Gemm`` with a dynamic batch
dimension, built directly with ``onnx.helper``, so it runs in onnxruntime for any number of rows.
A model with categorical columns takes its raw columns in both: the JSON holds the levels, and the
ONNX graph has one ``[rows, 1]`` input per raw column, named by it (strings for categorical
columns, encoded by ``ai.onnx.ml`` ``OneHotEncoder``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cropyield.encoding import Encoding
from cropyield.errors import CropYieldError

JSON_FORMAT = "cropyield-linear/1"


class JsonPredictor:
    """Predicts from a JSON export with numpy alone: ``((x - mean) / std) @ weight.T + bias``.

    Example:
        >>> p = JsonPredictor({"format": "cropyield-linear/1", "feature_names": ["x0", "x1"],
        ...                    "target_names": ["y"], "weight": [[1.0, 2.0]], "bias": [3.0],
        ...                    "feature_mean": [0.0, 0.0], "feature_std": [1.0, 1.0]})
        >>> p.predict([[1.0, 1.0], [2.0, 0.0]]).tolist()
        [[6.0], [5.0]]
    """

    def __init__(self, spec: dict) -> None:
        if spec.get("format") != JSON_FORMAT:
            raise CropYieldError(f"not a {JSON_FORMAT} export (format: {spec.get('format')!r})")
        self.feature_names = list(spec["feature_names"])
        self.target_names = list(spec["target_names"])
        self.weight = np.asarray(spec["weight"], dtype=np.float32)
        self.bias = np.asarray(spec["bias"], dtype=np.float32)
        self.mean = np.asarray(spec["feature_mean"], dtype=np.float32)
        self.std = np.asarray(spec["feature_std"], dtype=np.float32)
        self.encoding = Encoding.from_dict(spec["encoding"]) if spec.get("encoding") else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> JsonPredictor:
        try:
            return cls(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CropYieldError(f"{path}: not a readable cropyield JSON export ({err})") from None

    def predict(self, rows) -> np.ndarray:
        """Rows of numbers in feature order, or (with categorical columns, or keyed by name) raw rows:
        lists in the input columns' order or dicts keyed by column, strings encoded as training did."""
        dicts = isinstance(rows, dict) or (isinstance(rows, list) and rows and isinstance(rows[0], dict))
        if self.encoding is not None or dicts:
            x = (self.encoding or Encoding(tuple(self.feature_names))).encode_rows(rows)
        else:
            x = np.asarray(rows, dtype=np.float32).reshape(-1, len(self.feature_names))
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def _linear(ckpt: str | os.PathLike):
    from cropyield.inference import LinearPredictor

    model = LinearPredictor.from_checkpoint(ckpt)
    mean, std = model.feature_mean.numpy(), model.feature_std.numpy()
    if not model.standardize:  # the identity scaler: (x - 0) / 1 == x exactly
        mean, std = np.zeros_like(mean), np.ones_like(std)
    return model, mean, std


def export_json(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the checkpoint's weights, bias, scaler and names as JSON."""
    model, mean, std = _linear(ckpt)
    spec = {
        "format": JSON_FORMAT,
        "feature_names": model.feature_names,
        "target_names": model.target_names,
        "weight": model.weight.tolist(),
        "bias": model.bias.tolist(),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
    }
    if model.encoding:  # categorical columns: raw columns in, levels to encode them
        spec["encoding"] = model.encoding
    Path(out).write_text(json.dumps(spec, indent=2) + "\n")
    return Path(out)


def export_onnx(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes an ONNX graph of the model with a dynamic batch dimension."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise CropYieldError("ONNX export needs onnx; install it with: pip install 'cropyield[onnx]'") from None
    model, mean, std = _linear(ckpt)
    n_in, n_out = len(model.feature_names), len(model.target_names)
    initializers = [
        numpy_helper.from_array(mean, "feature_mean"),
        numpy_helper.from_array(std, "feature_std"),
        numpy_helper.from_array(model.weight.numpy(), "weight"),
        numpy_helper.from_array(model.bias.numpy(), "bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "feature_mean"], ["centred"]),
        helper.make_node("Div", ["centred", "feature_std"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "weight", "bias"], ["yields"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["rows", n_in])]
    opsets = [helper.make_opsetid("", 17)]
    if model.encoding:
        inputs, encode, extra = _onnx_encoder(Encoding.from_dict(model.encoding), helper, numpy_helper, TensorProto)
        nodes, initializers = encode + nodes, initializers + extra
        opsets.append(helper.make_opsetid("ai.onnx.ml", 2))
    graph = helper.make_graph(
        nodes,
        "cropyield",
        inputs,
        [helper.make_tensor_value_info("yields", TensorProto.FLOAT, ["rows", n_out])],
        initializers,
        doc_string=f"features: {', '.join(model.feature_names)}; yields: {', '.join(model.target_names)}",
    )
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="cropyield")
    onnx_model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, out)
    return Path(out)


def _onnx_encoder(encoding: Encoding, helper, numpy_helper, TensorProto):
    """Graph inputs, one ``[rows, 1]`` tensor per raw column (strings for categorical ones), and
    the nodes that encode them into ``features``: ``ai.onnx.ml`` ``OneHotEncoder`` with ``zeros=0``,
    so an unseen level fails the run instead of becoming the reference (onnxruntime's error names
    the node, which is named by its column), then the reference level's column sliced off."""
    inputs, nodes, initializers, parts = [], [], [], []
    for k, name in enumerate(encoding.columns):
        tensor = name  # the graph's inputs are the raw columns, by name
        if name not in encoding.levels:
            inputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, ["rows", 1]))
            parts.append(tensor)
            continue
        levels = list(encoding.levels[name])
        inputs.append(helper.make_tensor_value_info(tensor, TensorProto.STRING, ["rows", 1]))
        # Named by its column: onnxruntime's error for an unseen level names the node, not the value.
        nodes.append(helper.make_node("OneHotEncoder", [tensor], [f"onehot_{k}"], name=name, domain="ai.onnx.ml",
                                      cats_strings=levels, zeros=0))  # fmt: skip
        initializers += [
            numpy_helper.from_array(np.array([-1, len(levels)], dtype=np.int64), f"shape_{k}"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"start_{k}"),
            numpy_helper.from_array(np.array([len(levels)], dtype=np.int64), f"end_{k}"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"axis_{k}"),
        ]
        nodes += [
            helper.make_node("Reshape", [f"onehot_{k}", f"shape_{k}"], [f"flat_{k}"]),
            helper.make_node("Slice", [f"flat_{k}", f"start_{k}", f"end_{k}", f"axis_{k}"], [f"dummies_{k}"]),
        ]
        parts.append(f"dummies_{k}")
    nodes.append(helper.make_node("Concat", parts, ["features"], axis=1))
    return inputs, nodes, initializers


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``cropyield-export``: errors are one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="cropyield-export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to export")
    parser.add_argument("--format", required=True, choices=["json", "onnx"], help="json (numpy-only reader) or onnx")
    parser.add_argument("--out", required=True, help="file to write")
    args = parser.parse_args(argv)
    try:
        path = (export_json if args.format == "json" else export_onnx)(args.ckpt, args.out)
    except CropYieldError as err:
        print(f"cropyield-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")
