"""ONNX export of a classifier: one self-describing file, parity with torch, and a gated int8 copy.

The library side of the `export` stage (`stages/export.py` loads the champion from MLflow and logs the run):
`stablesdg export` loads `models:/<registered_model>@champion`, exports it to a single-file ONNX model with a
dynamic batch dimension and the preprocessing contract of `deploy/` in `metadata_props`, proves parity with
torch on the real test images and, when `export.quantize` is on, statically quantizes it to int8 (calibrated
on real train images). The int8 file is kept only when its test accuracy drops by at most
`export.max_accuracy_drop` points. `models/quantized/` always exists and always holds `gate.json` (the
decision and its numbers), so DVC outputs are stable whether or not the int8 model survives.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import uses_external_data
from torch import nn

from .classifier import ImageSet, load_images, predict_logits, real_split, synthetic_split
from .config import ExportConfig
from .data import class_names_in
from .errors import StableSDGError
from .preprocess import PreprocessSpec
from .provenance import UNKNOWN
from .quantize import INT8_FORMATS, QuantConfig, quantize_model, stratified_sample
from .utils import sha256_tree

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # deploy/src/stablesdg_line/contract.py
DESCRIPTIVE_KEYS = ("model_name", "model_version", "data_hash", "weights_sha256", "stablesdg_version",
                    "quantized", "opset")
INT8_FILE, GATE_FILE = "classifier.int8.onnx", "gate.json"
FIRST_DYNAMO_OPSET = 18  # the dynamo exporter cannot down-convert below 18; TorchScript honours 11-20


class ExportError(StableSDGError, RuntimeError):
    """The champion cannot be shipped: missing, inconsistent with the data, or the ONNX model disagrees."""


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    n_images: int
    atol: float
    rtol: float
    within_tolerance: bool  # every logit: |onnx - torch| <= atol + rtol * |torch| (numpy.allclose)
    top1_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.within_tolerance and not self.top1_mismatches


@dataclass
class Gate:
    decision: str  # kept | rejected | skipped
    reason: str
    max_accuracy_drop_points: float
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    accuracy_drop_points: float | None = None
    int8_format: str | None = None
    calibration_images: int = 0
    calibration: str = ""  # method/granularity/format(+fp32 nodes) on which images (stablesdg.quantize)
    # The decision's own resolution: one test image's worth of accuracy, and how many images the drop may still
    # grow by before the gate flips (under 1: a 1e-6 drift in the weights can change the decision)
    one_image_points: float | None = None
    margin_images: float | None = None

    @property
    def kept(self) -> bool:
        return self.decision == "kept"


# --------------------------------------------------------------------------------------- hashing
def weights_sha256(model: nn.Module) -> str:
    """Hash of the state_dict (names, dtypes, shapes, raw bytes): same weights, same hash, any machine."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_hash(version_tags: dict[str, str], processed: Path) -> str:
    """The data the champion was trained on, as registry.version_tags recorded it (DVC md5 first)."""
    if version_tags.get("data_hash", UNKNOWN) != UNKNOWN:
        return version_tags["data_hash"]
    wanted = processed.as_posix()
    for prefix, label in (("dvc_hash.", "dvc-md5"), ("data_sha256.", "sha256")):
        exact = version_tags.get(prefix + wanted)
        loose = [v for k, v in sorted(version_tags.items()) if k.startswith(prefix) and k.endswith("processed")]
        if exact or loose:
            return f"{label}:{exact or loose[0]}"
    return f"sha256:{sha256_tree(processed)}"


# --------------------------------------------------------------------------------------- ONNX files
def _atomic_save(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)  # a crashed export never leaves a half-written model where the line looks
    return path


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace our keys in metadata_props, keeping other tools' keys (e.g. onnxruntime.quant's)."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        proto.metadata_props.add(key=key, value=str(value))


def stamp(path: Path, metadata: dict[str, str]) -> Path:
    """Add `metadata` to a saved model (what is known only after it was checked: parity, the int8 decision)."""
    proto = onnx.load_model(str(path))
    set_metadata(proto, metadata)
    return _atomic_save(proto, path)


def export_stamp(parity: Parity, gate: Gate) -> dict[str, str]:
    return {"parity_max_abs_diff": f"{parity.max_abs_diff:.3g}", "parity_top1_agreement": f"{parity.top1_agreement:.6f}",
            "parity_images": str(parity.n_images), "int8_decision": gate.decision, "int8_reason": gate.reason}


def latency_ms(path: Path, x: np.ndarray, runs: int = 20) -> float:
    """Median single-image latency with one thread (the line's default), after one warm-up run."""
    return round(float(np.median(single_image_times(session(path, threads=1), x, runs))), 3)


def single_image_times(sess: ort.InferenceSession, x: np.ndarray, runs: int, warmups: int = 1) -> list[float]:
    """Milliseconds of `runs` single-image runs of `x[:1]`, after `warmups` untimed ones."""
    one = x[:1]
    for _ in range(warmups):
        sess.run([OUTPUT_NAME], {INPUT_NAME: one})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: one})
        times.append((time.perf_counter() - start) * 1000)
    return times


def check_onnx(proto: onnx.ModelProto, opset: int, metadata_keys: Sequence[str]) -> None:
    """onnx.checker plus the contract: opset, I/O names, dynamic batch, no external data, metadata keys."""
    onnx.checker.check_model(proto, full_check=True)
    got_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if got_opset != opset:
        problems.append(f"opset is {got_opset}, export.opset asks for {opset}")
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        problems.append(f"I/O must be [{INPUT_NAME}] -> [{OUTPUT_NAME}], got {inputs} -> {outputs}")
    elif proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        problems.append("batch dimension is fixed, not dynamic")
    if any(uses_external_data(t) for t in proto.graph.initializer):
        problems.append("weights are stored as external data, not in the single file")
    present = {p.key for p in proto.metadata_props}
    problems += [f"metadata key '{k}' missing" for k in metadata_keys if k not in present]
    if problems:
        raise ExportError("exported ONNX model breaks the line contract: " + "; ".join(problems))


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: str | Path, opset: int,
                metadata: dict[str, str]) -> Path:
    """Export to ONE .onnx file (weights inside) with a dynamic batch and `spec` + `metadata` as metadata_props."""
    h, w = spec.input_size
    example = (torch.zeros(1, spec.input_channels, h, w),)
    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"  # any stray .onnx.data would land here, never next to the output
        if opset < FIRST_DYNAMO_OPSET:
            torch.onnx.export(model, example, str(raw), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, external_data=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        else:
            torch.onnx.export(model, example, str(raw), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        proto = onnx.load_model(str(raw), load_external_data=True)
    set_metadata(proto, {**spec.onnx_metadata(), **metadata, "quantized": "false", "opset": str(opset)})
    check_onnx(proto, opset, [*spec.onnx_metadata(), *DESCRIPTIVE_KEYS])
    return _atomic_save(proto, Path(path))


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default (physical cores)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def onnx_parity(model: nn.Module, onnx_path: str | Path, x: np.ndarray, names: Sequence[str],
                atol: float, rtol: float = 0.0) -> Parity:
    """Torch vs onnxruntime logits on the same preprocessed images; raises ExportError when they disagree.

    `rtol` matters only for large logits: fp32 spacing at |logit| 500 is 6e-5, so a pure 1e-4 bound would fail
    a correct export on a few rounding steps.
    """
    expected = predict_logits(model, x)
    got = onnx_logits(session(onnx_path), x)
    diff = float(np.abs(expected - got).max()) if len(x) else 0.0
    close = bool(np.allclose(got, expected, atol=atol, rtol=rtol))
    mismatch = np.flatnonzero(expected.argmax(1) != got.argmax(1))
    parity = Parity(diff, float(1 - len(mismatch) / max(1, len(x))), len(x), atol, rtol, close,
                    [str(names[int(i)]) for i in mismatch])
    if not parity.ok:
        raise ExportError(
            f"ONNX/torch parity failed on {len(x)} test images: max |logit diff| {diff:.3g} "
            f"(export.parity_atol {atol:g}, parity_rtol {rtol:g}), top-1 differs on {len(mismatch)} image(s)"
            + (f", e.g. {parity.top1_mismatches[:3]}" if len(mismatch) else "")
        )
    return parity


# --------------------------------------------------------------------------------------- int8
def calibration_sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` train images in a seeded order, so a small n still spans the classes."""
    order = np.random.default_rng(seed).permutation(len(x))
    return x[np.sort(order[: min(n, len(x))])]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray,
                  int8_format: str = "qdq", config: QuantConfig | None = None) -> Path:
    """Static int8 (uint8 activations, int8 weights; method, granularity and fp32 nodes from `config`, default
    MinMax per-channel) of an exported model, with our metadata and the contract checked (stablesdg.quantize).
    """
    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8 format must be one of {INT8_FORMATS}, got {int8_format!r}")
    config = replace(config or QuantConfig(), int8_format=int8_format)
    fp32 = onnx.load_model(str(fp32_path))
    with tempfile.TemporaryDirectory() as tmp:
        quant = Path(tmp) / "int8.onnx"
        quantize_model(fp32_path, quant, calibration, config)
        proto = onnx.load_model(str(quant))
    ours = {p.key: p.value for p in fp32.metadata_props}
    set_metadata(proto, {**ours, "quantized": "true", "int8_calibration": config.label})
    check_onnx(proto, int(ours["opset"]), list(ours))
    return _atomic_save(proto, Path(out_path))


def quant_config(cfg: ExportConfig, int8_format: str = "qdq") -> QuantConfig:
    """The export.* calibration params as a QuantConfig."""
    return QuantConfig(method=cfg.calibration_method, per_channel=cfg.calibration_per_channel,
                       int8_format=int8_format, fp32_nodes=tuple(cfg.fp32_nodes),
                       percentile=cfg.calibration_percentile)


def export_calibration(cfg: ExportConfig, seed: int, processed: Path, synthetic: Path,
                       spec: PreprocessSpec) -> np.ndarray:
    """`export.calibration_images` images from the real train split (+ the synthetic set when
    `export.calibration_sources` says so), in a seeded random order or stratified by class."""
    train = load_split(processed, spec, "train")
    x, y = train.x.numpy(), train.y.numpy()
    if cfg.calibration_sources == "train+synthetic":
        paths, labels = synthetic_split(synthetic, spec.class_names)
        if paths:
            extra = load_images(paths, labels, spec, desc="calibration synthetic")
            x, y = np.concatenate([x, extra.x.numpy()]), np.concatenate([y, extra.y.numpy()])
    if cfg.calibration_sampling == "stratified":
        return stratified_sample(x, y, cfg.calibration_images, seed)
    return calibration_sample(x, cfg.calibration_images, seed)


def int8_gate(fp32_accuracy: float, int8_accuracy: float, max_drop_points: float, n_test: int) -> Gate:
    """Keep the int8 model when it loses at most `max_drop_points` percentage points of accuracy on the `n_test`
    test images; the reason says how many images away from flipping the decision is."""
    drop = round((fp32_accuracy - int8_accuracy) * 100, 6)  # rounding: 0.9 - 0.9 must not read as a loss
    kept = drop <= max_drop_points
    image_points = 100 / n_test
    margin = (max_drop_points - drop) / image_points  # > 0: images the drop may grow by and still pass
    reason = (f"int8 test accuracy {int8_accuracy:.4f} vs fp32 {fp32_accuracy:.4f}: drop {drop:+.2f} points "
              f"{'<=' if kept else '>'} export.max_accuracy_drop {max_drop_points:g} (1 of {n_test} test images = "
              f"{image_points:.2f} points; {abs(margin):.1f} images {'to spare' if kept else 'over'}"
              f"{': within one image of flipping' if abs(margin) < 1 else ''})")
    return Gate("kept" if kept else "rejected", reason, max_drop_points, fp32_accuracy, int8_accuracy, drop,
                one_image_points=round(image_points, 4), margin_images=round(margin, 2))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


# --------------------------------------------------------------------------------------- data
def load_split(processed: Path, spec: PreprocessSpec, split: str) -> ImageSet:
    """The processed folder's real `split` images, preprocessed as `spec` says (the champion's contract)."""
    if not (processed / "splits").is_dir():
        raise ExportError(f"{processed} is not a processed dataset (no splits/): run `dvc repro ingest` or pass "
                          "--processed")
    found = class_names_in(processed)
    if found != list(spec.class_names):
        raise ExportError(f"the champion predicts {list(spec.class_names)} but {processed} has classes {found}")
    images = load_images(*real_split(processed, spec.class_names, split), spec, desc=split)
    if split == "test" and not len(images):
        raise ExportError(f"{processed} has no test images: parity and the int8 gate need them")
    return images
