"""Stage `export`: the MLflow registry's champion as one self-describing ONNX file (+ the int8 copy when the
accuracy gate keeps it), parity-checked on the real test images, logged as an MLflow run; the champion version
is tagged with where its ONNX is."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import click
import mlflow
import numpy as np
import onnx
from mlflow.entities.model_registry import ModelVersion
from torch import nn

from .. import __version__, registry, tracking
from ..classifier import ImageSet
from ..config import ExportConfig, Params
from ..export import (
    DESCRIPTIVE_KEYS,
    GATE_FILE,
    INT8_FILE,
    INT8_FORMATS,
    ExportError,
    Gate,
    Parity,
    accuracy,
    check_onnx,
    data_hash,
    export_calibration,
    export_onnx,
    export_stamp,
    int8_gate,
    latency_ms,
    load_split,
    onnx_logits,
    onnx_parity,
    quant_config,
    quantize_int8,
    session,
    stamp,
    weights_sha256,
)
from ..preprocess import PreprocessSpec
from ..provenance import PROVENANCE_KEYS, version_metadata
from ..tracking import tracking_uri
from ..utils import sha256_file, write_json
from .common import PROCESSED, cli_errors, load_or_exit, params_option, path_option


def load_champion(name: str) -> tuple[nn.Module, PreprocessSpec, ModelVersion]:
    """The `champion` version's torch model (CPU) and its logged preprocessing."""
    version = registry.alias_version(registry.client(), name, registry.CHAMPION)
    if version is None:
        raise ExportError(f"no champion to export: registered model '{name}' has no version with alias "
                          f"'{registry.CHAMPION}' in {tracking_uri()} (run `stablesdg train`, or "
                          f"`stablesdg registry promote VERSION`)")
    # By number, not by alias: a promotion during the export cannot mix two versions.
    model = mlflow.pytorch.load_model(f"models:/{name}/{version.version}", map_location="cpu")
    return model.eval(), registry.load_run_spec(version.run_id), version


def _replace_dir(build: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(build, dest)


def _file_info(path: Path) -> dict:
    return {"path": path.as_posix(), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _quantize_stage(cfg: ExportConfig, seed: int, fp32_path: Path, quantized_dir: Path, processed: Path,
                    spec: PreprocessSpec, test: ImageSet, fp32_logits: np.ndarray, int8_format: str,
                    parity: Parity, synthetic: Path) -> tuple[Gate, dict | None]:
    """Build `quantized_dir` from scratch: gate.json always, the int8 model only when the gate keeps it."""
    quantized_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{quantized_dir.name}-", dir=quantized_dir.parent))
    try:
        if not cfg.quantize:
            gate = Gate("skipped", "export.quantize is false", cfg.max_accuracy_drop)
        else:
            calib = export_calibration(cfg, seed, processed, synthetic, spec)
            int8_path = quantize_int8(fp32_path, build / INT8_FILE, calib, int8_format, quant_config(cfg, int8_format))
            int8_logits = onnx_logits(session(int8_path), test.x.numpy())
            y = test.y.numpy()
            gate = int8_gate(accuracy(fp32_logits, y), accuracy(int8_logits, y), cfg.max_accuracy_drop, len(y))
            gate.int8_format, gate.calibration_images = int8_format, len(calib)
            gate.calibration = (f"{quant_config(cfg, int8_format).label} on {cfg.calibration_sources} "
                                f"({cfg.calibration_sampling})")
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


def export_champion(params: Params, processed: str | Path = PROCESSED,
                    out: str | Path = "models/classifier.onnx", quantized_dir: str | Path = "models/quantized",
                    int8_format: str = "qdq", log_to_mlflow: bool = True,
                    synthetic: str | Path = "data/synthetic") -> dict:
    """The whole stage; returns the export report (`export_metrics` picks the declared metrics from it)."""
    processed, out, quantized_dir = Path(processed), Path(out), Path(quantized_dir)
    tracking.configure(params.tracking.experiment)
    name, cfg = params.tracking.registered_model, params.export
    model, spec, version = load_champion(name)
    metadata = {**version_metadata(version.tags), "model_name": name, "model_version": str(version.version),
                "data_hash": data_hash(version.tags, processed), "weights_sha256": weights_sha256(model),
                "stablesdg_version": __version__, "mlflow_run_id": version.run_id}
    test = load_split(processed, spec, "test")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging:
        # Only a model that passed parity ever appears at `out` (the line may be watching that path).
        staged = export_onnx(model, spec, Path(staging) / out.name, cfg.opset, metadata)
        parity = onnx_parity(model, staged, test.x.numpy(), [p.name for p in test.paths], cfg.parity_atol,
                             cfg.parity_rtol)
        fp32_logits = onnx_logits(session(staged), test.x.numpy())
        gate, int8_info = _quantize_stage(cfg, params.seed, staged, quantized_dir, processed, spec, test, fp32_logits,
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
    fp32, int8 = summary["fp32"], summary["int8"]
    tags = {"model_name": summary["model_name"], "model_version": summary["model_version"],
            "source_run_id": summary["source_run_id"], "int8_decision": int8["decision"]}
    with tracking.stage_run("export", params, inputs=[processed], run_name="export", extra_tags=tags) as run:
        metrics = {"onnx_size_bytes": fp32["size_bytes"], "parity_max_abs_diff": fp32["parity"]["max_abs_diff"],
                   "parity_top1_agreement": fp32["parity"]["top1_agreement"],
                   "fp32_test_accuracy": fp32["test_accuracy"], "int8_kept": float(int8["kept"])}
        for key in ("int8_accuracy", "accuracy_drop_points", "margin_images"):
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
@path_option("--processed", default=PROCESSED, file_okay=False)
@path_option("--synthetic", default="data/synthetic", file_okay=False,
             help="Synthetic images, used for int8 calibration when export.calibration_sources says so.")
@path_option("--out", default="models/classifier.onnx", dir_okay=False)
@path_option("--quantized-dir", default="models/quantized", file_okay=False,
             help=f"Always gets {GATE_FILE}; {INT8_FILE} only when the int8 gate keeps it.")
@path_option("--metrics", "metrics_file", default="metrics/export.json", dir_okay=False,
             help="The few figures DVC compares (see export_metrics).")
@path_option("--report", "report_file", default="reports/export/export.json", dir_okay=False,
             help="Everything: hashes, provenance, parity, the int8 gate.")
@click.option("--int8-format", type=click.Choice(INT8_FORMATS), default="qdq", show_default=True,
              help="onnxruntime int8 layout: QDQ measured 1.6x faster than QOperator on resnet18, equal on "
                   "mobilenet_v3_small (benchmarks/bench_inference.py).")
@cli_errors
def export_command(params_path: str, processed: Path, synthetic: Path, out: Path, quantized_dir: Path,
                   metrics_file: Path, report_file: Path, int8_format: str) -> None:
    """Export the MLflow champion to ONNX (+ gated int8), check parity on the real test set, log it."""

    params = load_or_exit(params_path)
    summary = export_champion(params, processed, out, quantized_dir, int8_format, synthetic=synthetic)
    write_json(report_file, summary)
    write_json(metrics_file, export_metrics(summary))
    fp32, int8 = summary["fp32"], summary["int8"]
    click.echo(f"export: {summary['model_name']} v{summary['model_version']} -> {out} "
               f"(sha256 {fp32['sha256'][:12]}, parity max diff {fp32['parity']['max_abs_diff']:.2g}, "
               f"test accuracy {fp32['test_accuracy']:.4f})")
    click.echo(f"int8: {int8['decision']} ({int8['reason']})" + (f" -> {int8['path']}" if int8["kept"] else ""))
