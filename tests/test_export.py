"""ONNX export of the registry champion: single file, contract metadata, parity, int8 gate, line runtime.

Real parts throughout: an MLflow sqlite registry with a logged + registered torch model, onnxruntime sessions,
and the deploy runtime (`stablesdg_line`) loading what the exporter wrote.
"""

from __future__ import annotations

import copy
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_processed
from stablesdg_line.classifier import Classifier, ModelIntegrityError, RuntimeOptions
from stablesdg_line.contract import DESCRIPTIVE_KEYS, PREPROCESSING_KEYS, parse_preprocess_spec
from torch import nn

from stablesdg import __version__, tracking
from stablesdg.classifier import ImageSet, build_backbone, load_images, make_spec, real_split
from stablesdg.commands.provenance import provenance_command
from stablesdg.config import Params, parse_params
from stablesdg.export import (
    GATE_FILE,
    INT8_FILE,
    ExportError,
    check_onnx,
    int8_gate,
    onnx_logits,
    onnx_parity,
    session,
    set_metadata,
    weights_sha256,
)
from stablesdg.provenance import adapter_hashes, prior_recipe_sha256
from stablesdg.registry import CHAMPION, client
from stablesdg.stages.export import export_champion, export_command, load_champion
from stablesdg.stages.train import log_classifier
from stablesdg.utils import sha256_file, sha256_tree

CLASSES = ["crazing", "patches", "scratches"]
SIZE = 64


def raw_params(**export) -> dict:
    return {"seed": 3, "classes": {c: {"initializer": "line"} for c in CLASSES},
            "classifier": {"backbone": "mobilenet_v3_small", "input_size": SIZE},
            "export": {"opset": 17, "quantize": True, "calibration_images": 60, **export}}


def quick_model(train: ImageSet) -> nn.Module:
    """Random weights with BatchNorm statistics of the train images: input-dependent logits, no training.

    (A few SGD steps on 9 images collapse mobilenet_v3 to a constant output in eval mode.)
    """
    torch.manual_seed(0)
    model = build_backbone("mobilenet_v3_small", len(CLASSES))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average over the one pass below
    with torch.no_grad():
        model.train()(train.x)
    return model.eval()


@dataclass
class Shipped:
    root: Path
    processed: Path
    params: Params
    model: nn.Module
    test: ImageSet
    summary: dict

    @property
    def onnx_path(self) -> Path:
        return self.root / "models" / "classifier.onnx"

    def torch_top1(self) -> np.ndarray:
        with torch.no_grad():
            return self.model(self.test.x).argmax(1).numpy()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Train-lite a champion, register it like `stablesdg train` does, export it once (int8 always kept)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        processed = make_processed(root, CLASSES, per_class=12, size=SIZE)
        params = parse_params(raw_params(max_accuracy_drop=100.0))
        spec = make_spec(CLASSES, params.classifier)
        model = quick_model(load_images(*real_split(processed, CLASSES, "train"), spec))
        with tracking.stage_run("train", params, inputs=[processed]) as run:
            uri = log_classifier(model, spec)
        name = params.tracking.registered_model
        data_tags = {k: v for k, v in mlflow.get_run(run.info.run_id).data.tags.items() if k.startswith("data_")}
        version = mlflow.register_model(uri, name, tags=data_tags)
        client().set_registered_model_alias(name, CHAMPION, version.version)
        summary = export_champion(params, processed, root / "models" / "classifier.onnx", root / "models" / "quantized")
        test = load_images(*real_split(processed, CLASSES, "test"), spec)
        yield Shipped(root, processed, params, model, test, summary)


def test_export_is_one_file_with_the_full_contract(shipped):
    assert sorted(p.name for p in shipped.onnx_path.parent.iterdir()) == ["classifier.onnx", "quantized"]
    proto = onnx.load(str(shipped.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(PREPROCESSING_KEYS) | set(DESCRIPTIVE_KEYS) <= set(meta)
    spec = parse_preprocess_spec(meta)  # the line runtime's own parser
    assert spec.class_names == tuple(CLASSES) and spec.input_shape == (3, SIZE, SIZE)
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
    params = parse_params(raw_params(parity_atol=0.0, parity_rtol=0.0))  # ORT and torch never agree to the bit
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
    assert labels == [CLASSES[i] for i in shipped.torch_top1()]
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
    correct = [CLASSES.index(p.label) == y for p, y in zip(clf.classify_files(shipped.test.paths),
                                                            shipped.test.y.tolist(), strict=True)]
    assert np.mean(correct) == pytest.approx(gate["int8_accuracy"])


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
    (shipped.root / "strict.yaml").write_text(yaml.safe_dump(raw_params(max_accuracy_drop=0.0)))
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


# --------------------------------------------------------------------------------------- provenance
def _git_repo(root: Path) -> str:
    for cmd in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    (root / "README").write_text("repo")
    subprocess.run(["git", "add", "README"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def traced(shipped, tmp_path_factory):
    """The shipped model registered again under its own name with full provenance tags (a git repo, a
    dvc.lock, a synthetic folder, adapters), made champion and exported without int8, from that repo."""
    repo = tmp_path_factory.mktemp("repo")
    commit = _git_repo(repo)
    (repo / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"ingest": {"outs": [{"path": "data/processed", "md5": "0ab1.dir"}]}}}))
    synthetic = repo / "data" / "synthetic" / "crazing"
    synthetic.mkdir(parents=True)
    (synthetic / "0.png").write_bytes(b"synthetic image bytes")
    adapter = repo / "models" / "adapters" / "crazing"
    adapter.mkdir(parents=True)
    (adapter / "adapter.json").write_text(json.dumps({"sha256": {"pytorch_lora_weights.safetensors": "c" * 64}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shipped.root / 'mlflow.db'}")
        mp.chdir(repo)
        tags = {"git_commit": commit, "git_dirty": "false", "data_hash": "dvc-md5:0ab1.dir",
                "synthetic_hash": f"sha256:{sha256_tree(repo / 'data' / 'synthetic')}",
                "prior_recipe_sha256": prior_recipe_sha256(), "adapter_sha256": json.dumps(adapter_hashes()),
                "test_set_sha256": "e" * 64, "test_accuracy": "0.5", "test_macro_f1": "0.4",
                "gain_macro_f1_mean": "+0.041200", "gain_macro_f1_std": "0.012000", "gain_repeats": "3",
                "mean_fid": "38.4215", "mean_kid": "8.2629", "feature_net": "surface"}
        source = client().get_model_version(shipped.params.tracking.registered_model, "1").source
        version = mlflow.register_model(source, "traced-classifier", tags=tags)
        client().set_registered_model_alias("traced-classifier", CHAMPION, version.version)
        params = parse_params({**raw_params(quantize=False), "tracking": {"registered_model": "traced-classifier"}})
        summary = export_champion(params, shipped.processed, repo / "classifier.onnx", repo / "quantized",
                                  log_to_mlflow=False)
        yield repo, tags, summary, mp


def _provenance(args: list[str]) -> tuple[int, dict[str, str]]:
    result = CliRunner().invoke(provenance_command, args)
    rows = {}
    for line in result.output.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("OK", "MISMATCH", "SKIP"):
            rows[rest.strip().split("  ")[0]] = status
    return result.exit_code, rows


def test_onnx_metadata_carries_the_provenance_to_the_line(traced):
    repo, tags, summary, _ = traced
    meta = {p.key: p.value for p in onnx.load(str(repo / "classifier.onnx")).metadata_props}
    assert {k: meta[k] for k in tags} == tags  # copied from the version, not recomputed from the workspace
    parity = summary["fp32"]["parity"]
    assert meta["parity_images"] == str(parity["n_images"]) and float(meta["parity_max_abs_diff"]) <= 1e-4
    assert meta["int8_decision"] == "skipped" and meta["int8_reason"] == "export.quantize is false"
    assert meta["mlflow_run_id"] == client().get_model_version("traced-classifier", "1").run_id
    provenance = Classifier(repo / "classifier.onnx").describe()["provenance"]  # the line's reader, no torch
    assert provenance["git_commit"] == tags["git_commit"] and provenance["mean_fid"] == "38.4215"
    assert summary["provenance"]["gain_macro_f1_std"] == "0.012000"


def test_provenance_check_passes_against_the_repository(traced):
    code, rows = _provenance(["classifier.onnx"])
    assert code == 0, rows
    assert rows == {"git commit": "OK", "data_hash": "OK", "synthetic_hash": "OK", "prior recipe": "OK",
                    "adapters": "OK", "mlflow run id": "OK", "weights": "OK", "logits": "OK"}


def test_provenance_check_names_each_mismatch(traced, tmp_path):
    repo, _, _, _ = traced
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"]["ingest"]["outs"][0]["md5"] = "ffff.dir"  # the data moved on since the export
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "data" / "synthetic" / "crazing" / "1.png").write_bytes(b"one more")
    code, rows = _provenance(["classifier.onnx", "--lock", str(tmp_path / "dvc.lock")])
    (repo / "data" / "synthetic" / "crazing" / "1.png").unlink()
    assert code == 1 and rows["data_hash"] == rows["synthetic_hash"] == "MISMATCH"
    assert rows["git commit"] == rows["weights"] == "OK"

    # A graph whose weights differ from the registered version's, under the same metadata: the weights hash
    # in the metadata still matches the registry, the logits on the fixed input do not.
    proto = onnx.load(str(repo / "classifier.onnx"))
    bias = next(t for t in proto.graph.initializer if t.dims == [len(CLASSES)])
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1.0, bias.name))
    onnx.save(proto, str(tmp_path / "swapped.onnx"))
    code, rows = _provenance([str(tmp_path / "swapped.onnx")])
    assert code == 1 and rows["logits"] == "MISMATCH" and rows["weights"] == "OK"

    proto = onnx.load(str(repo / "classifier.onnx"))
    set_metadata(proto, {"git_commit": "0" * 40, "weights_sha256": "1" * 64})
    onnx.save(proto, str(tmp_path / "relabelled.onnx"))
    code, rows = _provenance([str(tmp_path / "relabelled.onnx")])
    assert code == 1 and rows["git commit"] == rows["weights"] == "MISMATCH"


def test_cli_calibration_params_reach_the_int8_model(shipped, monkeypatch):
    """export.calibration_* and fp32_nodes (issue 15): stratified real + synthetic images, Percentile, the first
    conv in fp32; the gate, the report and the int8 file's metadata say what was done. Last in the file: it
    re-exports the champion, which re-tags the registry version the earlier tests read."""
    from PIL import Image

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shipped.root / 'mlflow.db'}")
    monkeypatch.chdir(shipped.root)
    synthetic = shipped.root / "calib_synthetic"
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (synthetic / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(synthetic / cls / f"{i}.png")
    raw = raw_params(max_accuracy_drop=100.0, calibration_images=12, calibration_sources="train+synthetic",
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
