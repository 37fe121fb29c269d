"""Model registry policy on a real MLflow sqlite store and through a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_processed, run_cli
from PIL import Image

from stablesdg.classifier import TrainResult, build_backbone, evaluate, predict_logits, train_classifier
from stablesdg.comparison import VariantResult, load_splits, scorer_on_test_set
from stablesdg.config import parse_params
from stablesdg.errors import RegistryError
from stablesdg.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    ComparisonSet,
    Evidence,
    alias_version,
    client,
    list_versions,
    promote,
    register_best,
    rollback,
)
from stablesdg.stages.train import log_classifier
from stablesdg.tracking import git_dirty, stage_run

CLASSES = ["crazing", "patches", "scratches"]
NAME = "steel-defect-classifier"


def registry_params() -> object:
    return parse_params({
        "seed": 7, "classes": {c: {"initializer": "line"} for c in CLASSES},
        "classifier": {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 4, "batch_size": 8,
                       "learning_rate": 0.003, "patience": 4, "repeats": 1},
    })


def constant_model(label: int) -> torch.nn.Module:
    """A real backbone whose head always answers `label`: a deliberately weak model (macro-F1 1/6 on 3 classes)."""
    model = build_backbone("mobilenet_v3_small", len(CLASSES))
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), len(CLASSES)).float() * 5)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real datasets (different test sets) and one trained classifier."""
    root = tmp_path_factory.mktemp("regdata")
    params = registry_params()
    processed = make_processed(root / "a", CLASSES, per_class=10, size=64, k_shot=4, seed=0)
    other = make_processed(root / "b", CLASSES, per_class=10, size=64, k_shot=4, seed=1)
    splits = load_splits(processed, root / "no-synthetic", params)
    other_splits = load_splits(other, root / "no-synthetic", params)
    model = train_classifier(splits.train, splits.val, splits.spec, params.classifier, params.seed).model
    return params, splits, other_splits, model


def log_and_register(model, splits, params, variant: str, **card):
    """Log `model` as a training run exactly as the train stage does, then apply the registry policy."""
    tags = {"variant": variant, "test_set_sha256": splits.test_hash}
    with stage_run("train", params, inputs=[splits.root], run_name=variant, extra_tags=tags) as run:
        uri = log_classifier(model, splits.spec)
    result = VariantResult(variant, evaluate(model, splits.test, len(CLASSES)), TrainResult(model),
                           run.info.run_id, uri, splits.test_hash, len(splits.train), 0, len(splits.train))
    test = ComparisonSet(splits.test_hash, splits.spec, scorer_on_test_set(splits))
    evidence = Evidence(splits.root, **card)
    return result, register_best(params.tracking.registered_model, params.classifier, [result], test, None,
                                 run.info.run_id, evidence)


def aliases(mlflow_client) -> dict[str, str]:
    return {a: str(alias_version(mlflow_client, NAME, a).version)
            for a in (CHAMPION, CHALLENGER, PREVIOUS) if alias_version(mlflow_client, NAME, a)}


def check_policy(trained) -> None:
    """Champion only for a better model on the same test set; challenger otherwise; promote and rollback."""
    params, splits, _, model = trained
    mlflow_client = client()
    weak, reg1 = log_and_register(constant_model(0), splits, params, "real_only")
    assert reg1.alias == CHAMPION and reg1.reason == "first registered version"

    strong, reg2 = log_and_register(model, splits, params, "real_only")
    assert strong.evaluation.macro_f1 > weak.evaluation.macro_f1  # the premise of this test
    assert reg2.alias == CHAMPION and reg2.champion_before == "1"
    assert reg2.champion_value == pytest.approx(weak.evaluation.macro_f1)

    _, reg3 = log_and_register(constant_model(1), splits, params, "real_only")
    assert reg3.alias == CHALLENGER and "does not beat champion v2" in reg3.reason
    assert aliases(mlflow_client) == {CHAMPION: "2", CHALLENGER: "3", PREVIOUS: "1"}

    version2 = mlflow_client.get_model_version(NAME, "2")
    assert version2.tags["test_set_sha256"] == splits.test_hash
    assert float(version2.tags["test_macro_f1"]) == pytest.approx(strong.evaluation.macro_f1, abs=1e-6)
    assert "git_commit" in version2.tags and "champion" in version2.description
    assert version2.tags["git_dirty"] == git_dirty() and version2.tags["model_card"] == "model_card.html"
    assert version2.tags["data_hash"] == f"sha256:{version2.tags[f'data_sha256.{splits.root.as_posix()}']}"

    # The registry's champion is the in-memory model: same logits, and the batch dimension stays dynamic.
    loaded = mlflow.pytorch.load_model(f"models:/{NAME}@{CHAMPION}", map_location="cpu")
    for batch in (splits.test.x[:1], splits.test.x):
        np.testing.assert_allclose(predict_logits(loaded, batch), predict_logits(model, batch), atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    assert pyfunc.predict(splits.test.x[:5].numpy()).shape == (5, len(CLASSES))

    assert promote(mlflow_client, NAME, "3", "line trial approved") == "2"
    assert aliases(mlflow_client) == {CHAMPION: "3", PREVIOUS: "2"}
    assert mlflow_client.get_model_version(NAME, "3").tags["promotion_reason"].endswith("line trial approved")
    assert rollback(mlflow_client, NAME, "false rejects on line 2") == ("3", "2")
    assert aliases(mlflow_client) == {CHAMPION: "2", PREVIOUS: "3"}
    assert "false rejects" in mlflow_client.get_model_version(NAME, "2").tags["rollback_reason"]
    assert [r["version"] for r in list_versions(mlflow_client, NAME)] == ["1", "2", "3"]  # nothing deleted


def test_registry_policy_on_a_sqlite_store(trained, mlflow_store):
    check_policy(trained)


def test_champion_is_re_evaluated_on_a_different_test_set(trained, mlflow_store):
    params, splits, other_splits, model = trained
    assert other_splits.test_hash != splits.test_hash
    log_and_register(model, splits, params, "real_only")
    weak, reg = log_and_register(constant_model(2), other_splits, params, "real_only")
    on_new_set = evaluate(model, other_splits.test, len(CLASSES)).macro_f1
    assert "re-evaluated" in reg.reason
    assert reg.champion_value == pytest.approx(on_new_set)
    assert reg.alias == (CHAMPION if weak.evaluation.macro_f1 > on_new_set else CHALLENGER)
    tag = client().get_model_version(NAME, "2").tags["champion_v1_macro_f1_on_this_test_set"]
    assert float(tag) == pytest.approx(on_new_set, abs=1e-6)


def card_of(mlflow_client, version: str) -> str:
    mv = mlflow_client.get_model_version(NAME, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=mv.tags["model_card"])
    return Path(path).read_text()


def test_every_registered_version_has_a_self_contained_model_card(trained, mlflow_store, tmp_path):
    params, splits, _, model = trained
    grids = tmp_path / "grids"
    grids.mkdir()
    Image.new("RGB", (8, 4), "red").save(grids / "crazing.png")  # one class with a grid, two without
    fid_report = tmp_path / "fid_per_class.json"
    fid_report.write_text(json.dumps({"feature_net": "surface", "per_class": {
        c: {"fid_surface": 10.0 + i + 0.123456, "n_synthetic": 40} for i, c in enumerate(CLASSES)}}))
    result, reg = log_and_register(model, splits, params, "real_only", fid_report=fid_report, grids_dir=grids)
    mlflow_client = client()
    mv = mlflow_client.get_model_version(NAME, reg.version)
    card = card_of(mlflow_client, reg.version)
    assert mv.tags["model_card"] == "model_card.html" and "model_card.html" in mv.description
    assert mv.tags["feature_net"] == "surface"  # named by the evaluate report (metrics/fid.json has the means)
    ev = result.evaluation
    assert f"{ev.accuracy:.4f}" in card and f"{ev.macro_f1:.4f}" in card
    for cls, p, r in zip(CLASSES, ev.precision, ev.recall, strict=True):
        assert f"<td>{cls}</td><td>{p:.3f}</td><td>{r:.3f}</td>" in card
    for row in ev.confusion.tolist():
        assert "".join(f"<td>{n}</td>" for n in row) in card  # each confusion row, as counts
    assert "11.1235" in card and "12.1235" in card  # FID per class from the evaluate report
    assert card.count("data:image/png;base64,") == 1 and "scratches: no grid" in card
    assert "first registered version" in card and "@champion" in card
    assert mv.tags["test_set_sha256"] in card and mv.tags["git_commit"] in card
    assert "src=\"http" not in card and "<link" not in card  # self-contained: nothing to fetch


def test_promotion_needs_a_card_and_the_same_test_set(trained, mlflow_store, tmp_path):
    params, splits, other_splits, model = trained
    mlflow_client = client()
    log_and_register(model, splits, params, "real_only")  # v1: champion, with its card
    # v2: registered by hand (as before model cards existed): same test set, no card
    source = mlflow_client.get_model_version(NAME, "1").source
    mlflow.register_model(source, NAME, tags={"test_set_sha256": splits.test_hash})
    with pytest.raises(RegistryError, match=r"v2 has no model card"):
        promote(mlflow_client, NAME, "2", "looks fine")
    # v3: a card, but evaluated on another test set than the champion's
    _, reg3 = log_and_register(constant_model(0), other_splits, params, "real_only")
    assert reg3.alias == CHALLENGER  # the premise: v3 is not champion already
    with pytest.raises(RegistryError, match=r"v3 was tested on test set .* not comparable"):
        promote(mlflow_client, NAME, "3", "looks fine")
    assert aliases(mlflow_client)[CHAMPION] == "1"

    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    refused = run_cli(["stablesdg", "registry", "promote", "3", "--reason", "x", "--name", NAME], tmp_path, env,
                      check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr
    run_cli(["stablesdg", "registry", "promote", "3", "--force", "--reason", "new test set approved by QA",
             "--name", NAME], tmp_path, env)
    assert aliases(client()) == {CHAMPION: "3", PREVIOUS: "1"}
    forced = client().get_model_version(NAME, "3").tags["forced_promotion"]
    assert "new test set approved by QA" in forced and "not comparable" in forced
    assert "forced_promotion" not in client().get_model_version(NAME, "1").tags


def test_cli_errors_are_clear(trained, mlflow_store, tmp_path):
    params, splits, _, model = trained
    log_and_register(model, splits, params, "real_only")
    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    out = run_cli(["stablesdg", "registry", "promote", "1", "--reason", "x", "--name", NAME], tmp_path, env,
                  check=False)
    assert out.returncode != 0 and "already the champion" in out.stderr
    out = run_cli(["stablesdg", "registry", "rollback", "--reason", "x", "--name", NAME], tmp_path, env, check=False)
    assert out.returncode != 0 and "previous-champion" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` process on 127.0.0.1 with a sqlite backend and proxied artifacts."""
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_registry_through_a_real_mlflow_server(trained, mlflow_server, tmp_path):
    check_policy(trained)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    listing = run_cli(["stablesdg", "registry", "list", "--name", NAME], REPO_ROOT, env).stdout
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert set(rows) == {"1", "2", "3"} and "champion" in rows["2"] and "previous-champion" in rows["3"]
    run_cli(["stablesdg", "registry", "promote", "3", "--reason", "approved in review", "--name", NAME],
            REPO_ROOT, env)
    assert aliases(client()) == {CHAMPION: "3", PREVIOUS: "2"}
    shown = run_cli(["stablesdg", "registry", "show", "3", "--name", NAME], REPO_ROOT, env).stdout
    assert "approved in review" in shown and '"champion"' in shown
    run_cli(["stablesdg", "registry", "rollback", "--reason", "drift", "--name", NAME], REPO_ROOT, env)
    assert aliases(client())[CHAMPION] == "2"
