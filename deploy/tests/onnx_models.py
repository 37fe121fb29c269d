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
