"""Tiny contract-following ONNX classifiers built with onnx.helper: GlobalAveragePool -> Flatten -> Gemm.

With fixed weights the expected class of a solid-colour image is known: logits = W @ mean(normalised pixel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class ModelRecipe:
    class_names: tuple[str, ...]
    weight: np.ndarray  # [num_classes, input_channels]
    channel_mode: str
    input_channels: int
    size: tuple[int, int] = (8, 8)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    metadata_overrides: dict[str, str] = field(default_factory=dict)
    drop_keys: tuple[str, ...] = ()
    dynamic_hw: bool = False  # symbolic H and W in the graph: only the metadata says the size

    def metadata(self) -> dict[str, str]:
        base = {
            "class_names": json.dumps(list(self.class_names)),
            "input_size": json.dumps(list(self.size)),
            "channel_mode": self.channel_mode,
            "input_channels": str(self.input_channels),
            "mean": json.dumps(list(self.mean[: self.input_channels])),
            "std": json.dumps(list(self.std[: self.input_channels])),
            "resize": "bilinear",
            "model_name": "test-classifier",
            "model_version": "7",
            "data_hash": "abc123",
            "weights_sha256": "0" * 64,
            "stablesdg_version": "0.1.0",
            "quantized": "false",
            "opset": str(OPSET),
        }
        base.update(self.metadata_overrides)
        return {k: v for k, v in base.items() if k not in self.drop_keys}


RGB = ModelRecipe(("red_defect", "green_defect", "blue_defect"), 10 * np.eye(3, dtype=np.float32), "RGB", 3)
GRAY_TO_RGB = ModelRecipe(("dark", "bright"), np.array([[-5, -5, -5], [5, 5, 5]], np.float32), "L", 3)
GRAY_1CH = ModelRecipe(("dark", "bright"), np.array([[-10], [10]], np.float32), "L", 1,
                       mean=(0.5,), std=(0.5,))


def build_model(recipe: ModelRecipe) -> onnx.ModelProto:
    channels = recipe.weight.shape[1]  # the graph follows the weights, so metadata can be made to disagree
    height, width = recipe.size
    num_classes = len(recipe.class_names)
    spatial = ("H", "W") if recipe.dynamic_hw else (height, width)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
         helper.make_node("Gemm", ["features", "W", "B"], ["logits"], transB=1)],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, *spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializer=[numpy_helper.from_array(recipe.weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.zeros(num_classes, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    helper.set_model_props(model, recipe.metadata())
    onnx.checker.check_model(model)
    return model


def write_model(recipe: ModelRecipe, path: Path) -> Path:
    path.write_bytes(build_model(recipe).SerializeToString())
    return path


CONV_RGB = ModelRecipe(("red_defect", "green_defect", "blue_defect"), np.zeros((3, 8), np.float32), "RGB", 3,
                       size=(32, 32))


def build_conv_model(recipe: ModelRecipe = CONV_RGB, seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8) -> Relu -> Conv(8->8, stride 2) -> Relu -> GlobalAveragePool -> Gemm, seeded random weights:
    a graph whose batched and per-image runs take onnxruntime's real convolution kernels."""
    rng = np.random.default_rng(seed)
    num_classes, (height, width) = len(recipe.class_names), recipe.size
    init = {"W1": rng.normal(0, 0.5, (8, 3, 3, 3)), "B1": rng.normal(0, 0.1, 8),
            "W2": rng.normal(0, 0.3, (8, 8, 3, 3)), "B2": rng.normal(0, 0.1, 8),
            "W3": rng.normal(0, 1.0, (num_classes, 8)), "B3": np.zeros(num_classes)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
         helper.make_node("Gemm", ["features", "W3", "B3"], ["logits"], transB=1)],
        "tiny_conv_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    helper.set_model_props(model, recipe.metadata())
    onnx.checker.check_model(model)
    return model


def write_conv_model(path: Path, seed: int = 0) -> Path:
    path.write_bytes(build_conv_model(seed=seed).SerializeToString())
    return path
