"""int8 post-training quantization of an exported classifier: calibration data, method, granularity, fp32 nodes.

Library functions only (no click, no MLflow): the export stage and `benchmarks/bench_line_model.py` both call
`quantize_model`. Issue 15: resnet18's int8 copy lost 1.0 point on NEU-CLS with MinMax ranges from 60 train
images in a random order; what can be tuned here:

- the calibration set: real train images and synthetic images, `stratified_sample` takes the same number from
  every class (round robin over a seeded order), so a small set still covers every class;
- the calibration method: onnxruntime's MinMax, Entropy (KL divergence) or Percentile (`percentile`);
- per-channel or per-tensor weight scales;
- nodes left in fp32: `first_conv` (the input layer sees the raw normalised image), `last_gemm` (the logits),
  or explicit node names.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_FORMATS = ("qdq", "qoperator")
FP32_NODE_ALIASES = ("first_conv", "last_gemm")
INPUT_NAME = "input"  # deploy/src/stablesdg_line/contract.py


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. The defaults are the export stage's behaviour before issue 15."""

    method: str = "minmax"
    per_channel: bool = True
    int8_format: str = "qdq"
    fp32_nodes: tuple[str, ...] = ()  # "first_conv", "last_gemm" and/or node names of the pre-processed graph
    percentile: float = 99.999  # method "percentile": the kept share of |activation| values, in percent
    batch_size: int = 8  # calibration batches

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if self.int8_format not in INT8_FORMATS:
            raise ValueError(f"int8 format must be one of {INT8_FORMATS}, got {self.int8_format!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def label(self) -> str:
        """Short name for tables: `entropy/pc/qdq+fp32(first_conv,last_gemm)`."""
        base = f"{self.method}{f'({self.percentile:g})' if self.method == 'percentile' else ''}/" \
               f"{'pc' if self.per_channel else 'pt'}/{self.int8_format}"
        return base + (f"+fp32({','.join(self.fp32_nodes)})" if self.fp32_nodes else "")


def stratified_sample(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` images (or all, if fewer), the same number from each class as far as they go, in a seeded order.

    Round robin over the classes, each class in its own seeded permutation: with n = 60 and 6 classes every
    class gives 10, and a class that runs out leaves its turns to the others.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(x)):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop(0)))
    return x[np.sort(np.asarray(chosen, dtype=np.int64))] if chosen else x[:0]


def calibration_set(sources: Sequence[tuple[np.ndarray, np.ndarray]], n: int, seed: int) -> np.ndarray:
    """Stratified sample of `n` images from the union of (images, labels) sources (e.g. real train + synthetic)."""
    sources = [(x, y) for x, y in sources if len(x)]
    if not sources:
        raise ValueError("no calibration images")
    return stratified_sample(np.concatenate([x for x, _ in sources]), np.concatenate([y for _, y in sources]),
                             n, seed)


def resolve_fp32_nodes(model_path: str | Path, names: Sequence[str]) -> list[str]:
    """Node names for `first_conv` (the first Conv in graph order), `last_gemm` (the last Gemm/MatMul) and
    explicit names (kept as given; a name not in the graph is an error, not a silent no-op)."""
    import onnx

    graph = onnx.load_model(str(model_path), load_external_data=False).graph
    by_name = {node.name for node in graph.node}
    resolved: list[str] = []
    for name in names:
        if name == "first_conv":
            found = [n.name for n in graph.node if n.op_type == "Conv"][:1]
        elif name == "last_gemm":
            found = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
        elif name in by_name:
            found = [name]
        else:
            raise ValueError(f"fp32 node {name!r} is not in {model_path} (nor one of {FP32_NODE_ALIASES})")
        if not found:
            raise ValueError(f"{model_path} has no node for {name!r}")
        resolved += [f for f in found if f not in resolved]
    return resolved


def quantize_model(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray,
                   config: QuantConfig | None = None) -> dict:
    """Static int8 (uint8 activations, int8 weights) of `fp32_path` into `out_path`; returns what was done.

    uint8 activations: int8 x int8 has no fast path on x86 (measured 8-10x slower than u8 x s8 here). The
    returned dict names the calibration method, granularity, format and the nodes left in fp32, for reports.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = config or QuantConfig()
    if not len(calibration):
        raise ValueError("no calibration images")
    step = config.batch_size
    if config.method != "minmax":
        # onnxruntime's histogram collectors stack every batch's values into one array: batches of unequal size
        # fail ("inhomogeneous shape"), so use the largest batch size that divides the set evenly.
        step = max(d for d in range(1, min(step, len(calibration)) + 1) if len(calibration) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i : i + step]} for i in range(0, len(calibration), step)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    extra = {"CalibPercentile": config.percentile} if config.method == "percentile" else {}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))  # shape inference + folding: better calibration ranges
        excluded = resolve_fp32_nodes(pre, config.fp32_nodes)
        quantize_static(str(pre), str(out_path), Reader(),
                        quant_format=QuantFormat.QDQ if config.int8_format == "qdq" else QuantFormat.QOperator,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=excluded,
                        extra_options=extra)
    return {"method": config.method, "per_channel": config.per_channel, "int8_format": config.int8_format,
            "percentile": config.percentile if config.method == "percentile" else None,
            "fp32_nodes": list(config.fp32_nodes), "fp32_node_names": excluded,
            "calibration_images": int(len(calibration))}


def int8_layout(model_path: str | Path) -> dict[str, int]:
    """Counts of the int8 operator kinds in a model: QDQ (QuantizeLinear/DequantizeLinear around float ops)
    or QOperator (QLinearConv, QLinearMatMul, ...): what a test asserts to know which layout it got."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load_model(str(model_path), load_external_data=False).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type.startswith("QLinear") \
                or node.op_type in ("ConvInteger", "MatMulInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
