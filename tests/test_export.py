"""ONNX export of the registry champion: single file, contract metadata, parity, int8 gate, line runtime (the export
stage's command and its MLflow record: tests/stages/test_export.py; `stablesdg provenance`:
tests/commands/test_provenance.py).

Real parts throughout: an MLflow sqlite registry with a logged + registered torch model, onnxruntime sessions,
and the deploy runtime (`stablesdg_line`) loading what the exporter wrote.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import EXPORT_SIZE, THREE_CLASSES, export_raw_params
from stablesdg_line.classifier import Classifier, ModelIntegrityError, RuntimeOptions
from stablesdg_line.contract import DESCRIPTIVE_KEYS, PREPROCESSING_KEYS, parse_preprocess_spec

from stablesdg import __version__
from stablesdg.config import parse_params
from stablesdg.export import (
    GATE_FILE,
    INT8_FILE,
    ExportError,
    check_onnx,
    int8_gate,
    onnx_logits,
    onnx_parity,
    session,
    weights_sha256,
)
from stablesdg.stages.export import export_champion
from stablesdg.utils import sha256_file, sha256_tree


def test_export_is_one_file_with_the_full_contract(shipped):
    assert sorted(p.name for p in shipped.onnx_path.parent.iterdir()) == ["classifier.onnx", "quantized"]
    proto = onnx.load(str(shipped.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(PREPROCESSING_KEYS) | set(DESCRIPTIVE_KEYS) <= set(meta)
    spec = parse_preprocess_spec(meta)  # the line runtime's own parser
    assert spec.class_names == tuple(THREE_CLASSES) and spec.input_shape == (3, EXPORT_SIZE, EXPORT_SIZE)
    assert spec.channel_mode == "L" and spec.resize == "bilinear"
    np.testing.assert_allclose(spec.mean, [0.485, 0.456, 0.406], rtol=1e-6)
    assert meta["model_name"] == "steel-defect-classifier" and meta["model_version"] == "1"
    assert meta["quantized"] == "false" and meta["opset"] == "17" and meta["stablesdg_version"] == __version__
    assert meta["weights_sha256"] == weights_sha256(shipped.model)
    assert meta["data_hash"] == f"sha256:{sha256_tree(shipped.processed)}"  # from the version's data tag


def test_batch_is_dynamic_and_logits_match_torch(shipped):
    sess = session(shipped.onnx_path)
    x = shipped.test.x.numpy()
    with torch.no_grad():
        expected = shipped.model(shipped.test.x).numpy()
    one = sess.run(["logits"], {"input": x[:1]})[0]
    five = sess.run(["logits"], {"input": x[:5]})[0]
    assert one.shape == (1, 3) and five.shape == (5, 3)
    np.testing.assert_allclose(five, expected[:5], atol=1e-4, rtol=0)
    got = onnx_logits(sess, x)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert len(set(expected.argmax(1).tolist())) > 1, "degenerate test model: top-1 would prove nothing"
    parity = shipped.summary["fp32"]["parity"]
    assert parity["n_images"] == len(x) == 21 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_diff"] <= 1e-4


def test_parity_check_fails_when_onnx_and_torch_disagree(shipped):
    drifted = copy.deepcopy(shipped.model)
    with torch.no_grad():
        drifted.classifier[-1].bias += 0.01  # what a stale or wrong export looks like
    with pytest.raises(ExportError, match="parity failed"):
        onnx_parity(drifted, shipped.onnx_path, shipped.test.x.numpy(), ["a"] * len(shipped.test), 1e-4)


def test_failed_parity_leaves_no_model_behind(shipped):
    params = parse_params(export_raw_params(parity_atol=0.0, parity_rtol=0.0))  # ORT and torch never agree to the bit
    out = shipped.root / "zero-tolerance" / "classifier.onnx"
    with pytest.raises(ExportError, match=r"parity failed on 21 test images: max \|logit diff\|"):
        export_champion(params, shipped.processed, out, out.parent / "quantized", log_to_mlflow=False)
    assert list(out.parent.iterdir()) == []  # nothing at `out`, no staging leftovers


def test_contract_check_names_a_missing_metadata_key(shipped):
    proto = onnx.load(str(shipped.onnx_path))
    kept = [p for p in proto.metadata_props if p.key != "mean"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    with pytest.raises(ExportError, match="metadata key 'mean' missing"):
        check_onnx(proto, 17, ["mean", "std"])


def test_line_runtime_gives_torch_top1_and_pins_the_sha256(shipped):
    sha = shipped.summary["fp32"]["sha256"]
    assert sha == sha256_file(shipped.onnx_path)
    clf = Classifier(shipped.onnx_path, RuntimeOptions(expected_sha256=sha, warmup_runs=1))
    labels = [p.label for p in clf.classify_files(shipped.test.paths, batch_size=4)]
    assert labels == [THREE_CLASSES[i] for i in shipped.torch_top1()]
    assert clf.describe()["model_version"] == "1" and clf.describe()["quantized"] == "false"


def test_runtime_refuses_a_tampered_model(shipped, tmp_path):
    data = bytearray(shipped.onnx_path.read_bytes())
    weights = max(onnx.load(str(shipped.onnx_path)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    offset = bytes(data).find(weights[:256])
    assert offset > 0
    data[offset + len(weights) // 2] ^= 0x01  # one bit of one weight
    tampered = tmp_path / "classifier.onnx"
    tampered.write_bytes(bytes(data))
    Classifier(tampered)  # still a valid model: only the pin can tell
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Classifier(tampered, RuntimeOptions(expected_sha256=shipped.summary["fp32"]["sha256"]))


@pytest.mark.parametrize(("fp32", "int8", "max_drop", "decision"), [
    (0.90, 0.896, 0.5, "kept"),  # 0.4 points
    (0.90, 0.89, 0.5, "rejected"),  # 1.0 point
    (0.90, 0.90, 0.0, "kept"),  # no loss passes a zero threshold (no float noise)
    (0.80, 0.85, 0.0, "kept"),  # int8 better
    (0.85, 0.80, 4.99, "rejected"),
])
def test_int8_gate(fp32, int8, max_drop, decision):
    gate = int8_gate(fp32, int8, max_drop, n_test=500)
    assert gate.decision == decision and gate.kept == (decision == "kept")
    assert gate.accuracy_drop_points == pytest.approx((fp32 - int8) * 100)
    assert f"{max_drop:g}" in gate.reason
    assert gate.one_image_points == 0.2 and "1 of 500 test images = 0.20 points" in gate.reason
    assert gate.margin_images == pytest.approx((max_drop - (fp32 - int8) * 100) / 0.2)


def test_int8_gate_says_when_one_test_image_decides():
    # the default demo: 120 test images, so one image is 0.83 points, more than the 0.5-point limit
    gate = int8_gate(0.85, 0.85, 0.5, n_test=120)
    assert gate.kept and gate.margin_images == 0.6 and "within one image of flipping" in gate.reason
    wide = int8_gate(0.90, 0.90, 2.0, n_test=500)
    assert wide.margin_images == 10.0 and "within one image" not in wide.reason


def test_kept_int8_model_is_tagged_checked_and_runs_on_the_line(shipped):
    int8 = shipped.summary["int8"]
    path = shipped.onnx_path.parent / "quantized" / INT8_FILE
    assert int8["kept"] and int8["decision"] == "kept" and int8["sha256"] == sha256_file(path)
    gate = json.loads((path.parent / GATE_FILE).read_text())
    assert gate["decision"] == "kept" and gate["calibration_images"] == 9  # all 3 x 3 train images
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["quantized"] == "true" and meta["weights_sha256"] == weights_sha256(shipped.model)
    assert any(n.op_type in ("QLinearConv", "QuantizeLinear") for n in onnx.load(str(path)).graph.node)
    clf = Classifier(path, RuntimeOptions(expected_sha256=int8["sha256"]))
    correct = [THREE_CLASSES.index(p.label) == y for p, y in zip(clf.classify_files(shipped.test.paths),
                                                            shipped.test.y.tolist(), strict=True)]
    assert np.mean(correct) == pytest.approx(gate["int8_accuracy"])


