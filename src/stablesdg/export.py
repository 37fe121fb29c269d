"""Ship the registry's champion as one self-describing ONNX file (+ an int8 copy when it keeps its accuracy).

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
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from . import __version__
from .config import ExportConfig, Params
from .options import load_or_exit, params_option
from .preprocess import PreprocessSpec
from .provenance import PROVENANCE_KEYS, UNKNOWN, version_metadata
from .quantize import INT8_FORMATS, QuantConfig, quantize_model, stratified_sample
from .utils import sha256_file, sha256_tree, write_json

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from .classifier import ImageSet

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # deploy/src/stablesdg_line/contract.py
DESCRIPTIVE_KEYS = ("model_name", "model_version", "data_hash", "weights_sha256", "stablesdg_version",
                    "quantized", "opset")
INT8_FILE, GATE_FILE = "classifier.int8.onnx", "gate.json"
FIRST_DYNAMO_OPSET = 18  # the dynamo exporter cannot down-convert below 18; TorchScript honours 11-20


class ExportError(RuntimeError):
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

    @property
    def kept(self) -> bool:
        return self.decision == "kept"


# --------------------------------------------------------------------------------------- hashing
def weights_sha256(model: nn.Module) -> str:
    """Hash of the state_dict (names, dtypes, shapes, raw bytes): same weights, same hash, any machine."""
    import torch

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
    import onnx

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
    import onnx

    proto = onnx.load_model(str(path))
    set_metadata(proto, metadata)
    return _atomic_save(proto, path)


def export_stamp(parity: Parity, gate: Gate) -> dict[str, str]:
    return {"parity_max_abs_diff": f"{parity.max_abs_diff:.3g}", "parity_top1_agreement": f"{parity.top1_agreement:.6f}",
            "parity_images": str(parity.n_images), "int8_decision": gate.decision, "int8_reason": gate.reason}


def latency_ms(path: Path, x: np.ndarray, runs: int = 20) -> float:
    """Median single-image latency with one thread (the line's default), after one warm-up run."""
    sess = session(path, threads=1)
    one = x[:1]
    sess.run([OUTPUT_NAME], {INPUT_NAME: one})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: one})
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def check_onnx(proto: onnx.ModelProto, opset: int, metadata_keys: Sequence[str]) -> None:
    """onnx.checker plus the contract: opset, I/O names, dynamic batch, no external data, metadata keys."""
    import onnx
    from onnx.external_data_helper import uses_external_data

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
    import onnx
    import torch

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
    import onnxruntime as ort

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
    from .classifier import predict_logits

    expected = predict_logits(model, x)
    got = onnx_logits(session(onnx_path), x)
    diff = float(np.abs(expected - got).max()) if len(x) else 0.0
    close = bool(np.allclose(got, expected, atol=atol, rtol=rtol))
    mismatch = np.flatnonzero(expected.argmax(1) != got.argmax(1))
    parity = Parity(diff, float(1 - len(mismatch) / max(1, len(x))), len(x), atol, rtol, close,
                    [str(names[i]) for i in mismatch])
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
    import dataclasses

    import onnx

    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8 format must be one of {INT8_FORMATS}, got {int8_format!r}")
    config = dataclasses.replace(config or QuantConfig(), int8_format=int8_format)
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


def export_calibration(params: Params, processed: Path, synthetic: Path, spec: PreprocessSpec) -> np.ndarray:
    """`export.calibration_images` images from the real train split (+ data/synthetic when
    `export.calibration_sources` says so), in a seeded random order or stratified by class."""
    from .classifier import load_images, synthetic_images

    cfg = params.export
    train = _split(processed, spec, "train")
    x, y = train.x.numpy(), train.y.numpy()
    if cfg.calibration_sources == "train+synthetic":
        found = [(synthetic_images(synthetic, c), i) for i, c in enumerate(spec.class_names)]
        paths = [p for ps, _ in found for p in ps]
        labels = [i for ps, i in found for _ in ps]
        if paths:
            extra = load_images(paths, labels, spec, desc="calibration synthetic")
            x, y = np.concatenate([x, extra.x.numpy()]), np.concatenate([y, extra.y.numpy()])
    if cfg.calibration_sampling == "stratified":
        return stratified_sample(x, y, cfg.calibration_images, params.seed)
    return calibration_sample(x, cfg.calibration_images, params.seed)


def int8_gate(fp32_accuracy: float, int8_accuracy: float, max_drop_points: float) -> Gate:
    """Keep the int8 model when it loses at most `max_drop_points` percentage points of test accuracy."""
    drop = round((fp32_accuracy - int8_accuracy) * 100, 6)  # rounding: 0.9 - 0.9 must not read as a loss
    kept = drop <= max_drop_points
    reason = (f"int8 test accuracy {int8_accuracy:.4f} vs fp32 {fp32_accuracy:.4f}: drop {drop:+.2f} points "
              f"{'<=' if kept else '>'} export.max_accuracy_drop {max_drop_points:g}")
    return Gate("kept" if kept else "rejected", reason, max_drop_points, fp32_accuracy, int8_accuracy, drop)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


# --------------------------------------------------------------------------------------- the stage
def load_champion(name: str) -> tuple[nn.Module, PreprocessSpec, ModelVersion]:
    """The `champion` version's torch model (CPU) and its logged preprocessing."""
    import mlflow

    from . import registry
    from .tracking import tracking_uri

    version = registry.alias_version(registry.client(), name, registry.CHAMPION)
    if version is None:
        raise ExportError(f"no champion to export: registered model '{name}' has no version with alias "
                          f"'{registry.CHAMPION}' in {tracking_uri()} (run `stablesdg train`, or "
                          f"`stablesdg registry promote VERSION`)")
    # By number, not by alias: a promotion during the export cannot mix two versions.
    model = mlflow.pytorch.load_model(f"models:/{name}/{version.version}", map_location="cpu")
    return model.eval(), registry.load_run_spec(version.run_id), version


def _split(processed: Path, spec: PreprocessSpec, split: str) -> ImageSet:
    from .classifier import load_images, real_split
    from .data import class_names_in

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


def _replace_dir(build: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(build, dest)


def _file_info(path: Path) -> dict:
    return {"path": path.as_posix(), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _quantize_stage(params: Params, fp32_path: Path, quantized_dir: Path, processed: Path, spec: PreprocessSpec,
                    test: ImageSet, fp32_logits: np.ndarray, int8_format: str,
                    parity: Parity, synthetic: Path = Path("data/synthetic")) -> tuple[Gate, dict | None]:
    """Build `quantized_dir` from scratch: gate.json always, the int8 model only when the gate keeps it."""
    cfg = params.export
    quantized_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{quantized_dir.name}-", dir=quantized_dir.parent))
    try:
        if not cfg.quantize:
            gate = Gate("skipped", "export.quantize is false", cfg.max_accuracy_drop)
        else:
            calib = export_calibration(params, processed, synthetic, spec)
            int8_path = quantize_int8(fp32_path, build / INT8_FILE, calib, int8_format,
                                      quant_config(cfg, int8_format))
            int8_logits = onnx_logits(session(int8_path), test.x.numpy())
            y = test.y.numpy()
            gate = int8_gate(accuracy(fp32_logits, y), accuracy(int8_logits, y), cfg.max_accuracy_drop)
            gate.int8_format, gate.calibration_images = int8_format, len(calib)
            gate.calibration = f"{quant_config(cfg, int8_format).label} on {cfg.calibration_sources} " \
                               f"({cfg.calibration_sampling})"
            if gate.kept:
                stamp(int8_path, export_stamp(parity, gate))
            else:
                int8_path.unlink()
        write_json(build / GATE_FILE, asdict(gate))
        _replace_dir(build, quantized_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    info = None
    if gate.kept:
        info = {**_file_info(quantized_dir / INT8_FILE),
                "latency_ms": latency_ms(quantized_dir / INT8_FILE, test.x.numpy())}
    return gate, info


def export_champion(params: Params, processed: str | Path = "data/processed",
                    out: str | Path = "models/classifier.onnx", quantized_dir: str | Path = "models/quantized",
                    int8_format: str = "qdq", log_to_mlflow: bool = True,
                    synthetic: str | Path = "data/synthetic") -> dict:
    """The whole stage; returns the export report (`export_metrics` picks the declared metrics from it)."""
    import onnx

    from . import tracking

    processed, out, quantized_dir = Path(processed), Path(out), Path(quantized_dir)
    tracking.configure(params.tracking.experiment)
    name, cfg = params.tracking.registered_model, params.export
    model, spec, version = load_champion(name)
    metadata = {**version_metadata(version.tags), "model_name": name, "model_version": str(version.version),
                "data_hash": data_hash(version.tags, processed), "weights_sha256": weights_sha256(model),
                "stablesdg_version": __version__, "mlflow_run_id": version.run_id}
    test = _split(processed, spec, "test")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging:
        # Only a model that passed parity ever appears at `out` (the line may be watching that path).
        staged = export_onnx(model, spec, Path(staging) / out.name, cfg.opset, metadata)
        parity = onnx_parity(model, staged, test.x.numpy(), [p.name for p in test.paths], cfg.parity_atol,
                             cfg.parity_rtol)
        fp32_logits = onnx_logits(session(staged), test.x.numpy())
        gate, int8_info = _quantize_stage(params, staged, quantized_dir, processed, spec, test, fp32_logits,
                                          int8_format, parity, Path(synthetic))
        stamp(staged, export_stamp(parity, gate))
        check_onnx(onnx.load_model(str(staged)), cfg.opset, [*DESCRIPTIVE_KEYS, *PROVENANCE_KEYS])
        os.replace(staged, out)
    summary = {
        "model_name": name, "model_version": str(version.version), "source_run_id": version.run_id,
        "data_hash": metadata["data_hash"], "weights_sha256": metadata["weights_sha256"],
        "test_images": len(test), "opset": cfg.opset,
        "provenance": {k: metadata[k] for k in PROVENANCE_KEYS if k in metadata},
        "fp32": {**_file_info(out), "test_accuracy": accuracy(fp32_logits, test.y.numpy()),
                 "latency_ms": latency_ms(out, test.x.numpy()), "parity": asdict(parity)},
        "int8": {**asdict(gate), "kept": gate.kept, **(int8_info or {})},
    }
    if log_to_mlflow:
        summary["mlflow_run_id"] = log_export(params, summary, out, quantized_dir, processed)
    return summary


def log_export(params: Params, summary: dict, out: Path, quantized_dir: Path, processed: Path) -> str:
    """An `export` run with the files and numbers, and the champion version tagged with where its ONNX is."""
    import mlflow

    from . import registry, tracking

    fp32, int8 = summary["fp32"], summary["int8"]
    tags = {"model_name": summary["model_name"], "model_version": summary["model_version"],
            "source_run_id": summary["source_run_id"], "int8_decision": int8["decision"]}
    with tracking.stage_run("export", params, inputs=[processed], run_name="export", extra_tags=tags) as run:
        metrics = {"onnx_size_bytes": fp32["size_bytes"], "parity_max_abs_diff": fp32["parity"]["max_abs_diff"],
                   "parity_top1_agreement": fp32["parity"]["top1_agreement"],
                   "fp32_test_accuracy": fp32["test_accuracy"], "int8_kept": float(int8["kept"])}
        for key in ("int8_accuracy", "accuracy_drop_points"):
            if int8.get(key) is not None:
                metrics[key if key.startswith("int8") else f"int8_{key}"] = int8[key]
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out), artifact_path="onnx")
        mlflow.log_artifacts(str(quantized_dir), artifact_path="onnx/quantized")
        mlflow.log_dict(summary, "export.json")
    version_tags = {
        "onnx_sha256": fp32["sha256"], "onnx_size_bytes": str(fp32["size_bytes"]), "onnx_opset": str(summary["opset"]),
        "onnx_parity_max_abs_diff": f"{fp32['parity']['max_abs_diff']:.3g}",
        "onnx_parity_top1_agreement": f"{fp32['parity']['top1_agreement']:.6f}",
        "onnx_export_run_id": run.info.run_id, "int8_kept": str(int8["kept"]).lower(),
        "int8_gate": int8["reason"][:5000],
    }
    if int8["kept"]:
        version_tags["int8_sha256"] = int8["sha256"]
    client = registry.client()
    for key, value in version_tags.items():
        client.set_model_version_tag(summary["model_name"], summary["model_version"], key, value)
    return run.info.run_id


def export_metrics(summary: dict) -> dict:
    """What metrics/export.json declares to DVC: the int8 decision and the fp32 single-image latency, under
    short keys (`dvc exp show` makes one column per key); accuracy, hashes, parity, int8 latency: the report."""
    return {"int8": summary["int8"]["decision"], "ms": round(summary["fp32"]["latency_ms"], 1)}  # 0.1 ms: noise


@click.command("export")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="models/classifier.onnx", show_default=True, type=click.Path(dir_okay=False))
@click.option("--quantized-dir", default="models/quantized", show_default=True, type=click.Path(file_okay=False),
              help=f"Always gets {GATE_FILE}; {INT8_FILE} only when the int8 gate keeps it.")
@click.option("--metrics", "metrics_file", default="metrics/export.json", show_default=True,
              type=click.Path(dir_okay=False), help="The few figures DVC compares (see export_metrics).")
@click.option("--report", "report_file", default="reports/export/export.json", show_default=True,
              type=click.Path(dir_okay=False), help="Everything: hashes, provenance, parity, the int8 gate.")
@click.option("--synthetic", default="data/synthetic", show_default=True, type=click.Path(file_okay=False),
              help="Synthetic images for int8 calibration when export.calibration_sources is train+synthetic.")
@click.option("--int8-format", type=click.Choice(INT8_FORMATS), default="qdq", show_default=True,
              help="onnxruntime int8 layout: QDQ measured 1.6x faster than QOperator on resnet18, equal on "
                   "mobilenet_v3_small (benchmarks/bench_inference.py).")
def export_command(params_path: str, processed: str, out: str, quantized_dir: str, metrics_file: str,
                   report_file: str, synthetic: str, int8_format: str) -> None:
    """Export the MLflow champion to ONNX (+ gated int8), check parity on the real test set, log it."""

    params = load_or_exit(params_path)
    try:
        summary = export_champion(params, processed, out, quantized_dir, int8_format, synthetic=synthetic)
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    write_json(report_file, summary)
    write_json(metrics_file, export_metrics(summary))
    fp32, int8 = summary["fp32"], summary["int8"]
    click.echo(f"export: {summary['model_name']} v{summary['model_version']} -> {out} "
               f"(sha256 {fp32['sha256'][:12]}, parity max diff {fp32['parity']['max_abs_diff']:.2g}, "
               f"test accuracy {fp32['test_accuracy']:.4f})")
    click.echo(f"int8: {int8['decision']} ({int8['reason']})" + (f" -> {int8['path']}" if int8["kept"] else ""))
