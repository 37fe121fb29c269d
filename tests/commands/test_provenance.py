"""`stablesdg provenance`: the ONNX metadata carries the registry version's provenance to the line, and the check
against the repository passes, or names each mismatch (data, synthetic set, weights, logits, git commit).

Real parts: the exported champion (conftest `shipped`) registered again with full provenance tags in a git repo.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import onnx
import pytest
import yaml
from click.testing import CliRunner
from conftest import THREE_CLASSES, export_raw_params
from stablesdg_line.classifier import Classifier

from stablesdg.commands.provenance import provenance_command
from stablesdg.config import parse_params
from stablesdg.export import set_metadata
from stablesdg.provenance import adapter_hashes, prior_recipe_sha256
from stablesdg.registry import CHAMPION, client
from stablesdg.stages.export import export_champion
from stablesdg.utils import sha256_tree


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
        params = parse_params({**export_raw_params(quantize=False), "tracking": {"registered_model": "traced-classifier"}})
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
    bias = next(t for t in proto.graph.initializer if t.dims == [len(THREE_CLASSES)])
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1.0, bias.name))
    onnx.save(proto, str(tmp_path / "swapped.onnx"))
    code, rows = _provenance([str(tmp_path / "swapped.onnx")])
    assert code == 1 and rows["logits"] == "MISMATCH" and rows["weights"] == "OK"

    proto = onnx.load(str(repo / "classifier.onnx"))
    set_metadata(proto, {"git_commit": "0" * 40, "weights_sha256": "1" * 64})
    onnx.save(proto, str(tmp_path / "relabelled.onnx"))
    code, rows = _provenance([str(tmp_path / "relabelled.onnx")])
    assert code == 1 and rows["git commit"] == rows["weights"] == "MISMATCH"
