"""Stage `export`: the command with a zero int8 tolerance gates on the measured accuracies, the calibration params
reach the int8 model, the export is recorded on the champion version, and a missing champion is named.

Real parts: an MLflow sqlite registry with a logged + registered torch model (conftest `shipped`), onnxruntime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from conftest import EXPORT_SIZE, THREE_CLASSES, export_raw_params

from stablesdg.export import GATE_FILE, INT8_FILE, ExportError
from stablesdg.registry import client
from stablesdg.stages.export import export_command, load_champion
from stablesdg.utils import sha256_file


def test_mlflow_records_the_export_on_the_champion_version(shipped):
    name = shipped.params.tracking.registered_model
    mv = client().get_model_version(name, "1")  # the fixture's store is still the active one
    run = client().get_run(mv.tags["onnx_export_run_id"])
    artifacts = [a.path for a in client().list_artifacts(run.info.run_id, "onnx")]
    assert mv.tags["onnx_sha256"] == shipped.summary["fp32"]["sha256"] and mv.tags["int8_kept"] == "true"
    assert mv.tags["int8_sha256"] == shipped.summary["int8"]["sha256"]
    assert float(mv.tags["onnx_parity_max_abs_diff"]) <= 1e-4
    assert "onnx/classifier.onnx" in artifacts
    assert run.data.metrics["parity_top1_agreement"] == 1.0 and run.data.tags["model_version"] == "1"


def test_cli_with_zero_tolerance_gates_on_the_measured_accuracies(shipped, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shipped.root / 'mlflow.db'}")
    monkeypatch.chdir(shipped.root)
    (shipped.root / "strict.yaml").write_text(yaml.safe_dump(export_raw_params(max_accuracy_drop=0.0)))
    quantized = shipped.root / "strict" / "quantized"
    (quantized / INT8_FILE).parent.mkdir(parents=True)
    (quantized / INT8_FILE).write_text("stale")  # a previous run's file must not survive a rejection
    result = CliRunner().invoke(export_command, [
        "--params", "strict.yaml", "--processed", str(shipped.processed), "--out", "strict/classifier.onnx",
        "--quantized-dir", str(quantized), "--metrics", "strict/metrics.json", "--report", "strict/export.json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((shipped.root / "strict" / "export.json").read_text())
    declared = json.loads((shipped.root / "strict" / "metrics.json").read_text())
    assert list(declared) == ["int8", "ms"] and declared["int8"] == metrics["int8"]["decision"]
    assert 0 < declared["ms"] == round(metrics["fp32"]["latency_ms"], 1)
    gate = json.loads((quantized / GATE_FILE).read_text())
    assert gate["decision"] == ("kept" if gate["int8_accuracy"] >= gate["fp32_accuracy"] else "rejected")
    assert (quantized / INT8_FILE).exists() == (gate["decision"] == "kept") == metrics["int8"]["kept"]
    if metrics["int8"]["kept"]:
        assert sha256_file(quantized / INT8_FILE) == metrics["int8"]["sha256"]
    assert gate["int8_accuracy"] == shipped.summary["int8"]["int8_accuracy"]  # deterministic calibration
    # Same champion, same graph and metadata; only the int8 gate's verdict (stamped into the fp32 file too)
    # depends on export.max_accuracy_drop.
    strict, first = (onnx.load(str(p)) for p in (shipped.root / "strict" / "classifier.onnx", shipped.onnx_path))
    assert strict.graph.SerializeToString() == first.graph.SerializeToString()
    meta = [{p.key: p.value for p in m.metadata_props if not p.key.startswith("int8_")} for m in (strict, first)]
    assert meta[0] == meta[1]
    assert {p.key: p.value for p in strict.metadata_props}["int8_decision"] == gate["decision"]
    assert f"int8: {gate['decision']}" in result.output


def test_missing_champion_names_the_model_and_the_alias(shipped, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shipped.root / 'mlflow.db'}")
    with pytest.raises(ExportError, match=r"'no-such-model' has no version with alias 'champion'"):
        load_champion("no-such-model")
    client().create_registered_model("unaliased")
    with pytest.raises(ExportError, match=r"'unaliased' has no version with alias 'champion'"):
        load_champion("unaliased")


def test_cli_calibration_params_reach_the_int8_model(shipped, monkeypatch):
    """export.calibration_* and fp32_nodes (issue 15): stratified real + synthetic images, Percentile, the first
    conv in fp32; the gate, the report and the int8 file's metadata say what was done. Last in the file: it
    re-exports the champion, which re-tags the registry version the earlier tests read."""
    from PIL import Image

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shipped.root / 'mlflow.db'}")
    monkeypatch.chdir(shipped.root)
    synthetic = shipped.root / "calib_synthetic"
    rng = np.random.default_rng(0)
    for cls in THREE_CLASSES:
        (synthetic / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (EXPORT_SIZE, EXPORT_SIZE), dtype=np.uint8)).save(synthetic / cls / f"{i}.png")
    raw = export_raw_params(max_accuracy_drop=100.0, calibration_images=12, calibration_sources="train+synthetic",
                     calibration_sampling="stratified", calibration_method="percentile",
                     fp32_nodes=["first_conv"])
    (shipped.root / "calib.yaml").write_text(yaml.safe_dump(raw))
    quantized = shipped.root / "calib" / "quantized"
    result = CliRunner().invoke(export_command, [
        "--params", "calib.yaml", "--processed", str(shipped.processed), "--synthetic", str(synthetic),
        "--out", "calib/classifier.onnx", "--quantized-dir", str(quantized), "--metrics", "calib/metrics.json",
        "--report", "calib/export.json"])
    assert result.exit_code == 0, result.output
    gate = json.loads((quantized / GATE_FILE).read_text())
    assert gate["calibration_images"] == 12  # 9 train + 15 synthetic available, 4 per class taken
    assert gate["calibration"] == "percentile(99.999)/pc/qdq+fp32(first_conv) on train+synthetic (stratified)"
    int8 = onnx.load(str(quantized / INT8_FILE))
    meta = {p.key: p.value for p in int8.metadata_props}
    assert meta["int8_calibration"] == "percentile(99.999)/pc/qdq+fp32(first_conv)"
    first_conv = next(n for n in int8.graph.node if n.op_type == "Conv")
    assert first_conv.input[0] == "input"  # no QuantizeLinear/DequantizeLinear in front of the first conv
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 0
