"""Model registry policy on a real MLflow sqlite store and through a real `mlflow server` on 127.0.0.1 (the
`stablesdg registry` commands' own tests: tests/commands/test_registry.py)."""

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
from conftest import REGISTRY_NAME, REPO_ROOT, THREE_CLASSES, log_and_register, run_cli
from PIL import Image

from stablesdg.classifier import build_backbone, evaluate, predict_logits
from stablesdg.errors import RegistryError
from stablesdg.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    alias_version,
    client,
    list_versions,
    promote,
    rollback,
)
from stablesdg.tracking import git_dirty


def constant_model(label: int) -> torch.nn.Module:
    """A real backbone whose head always answers `label`: a deliberately weak model (macro-F1 1/6 on 3 classes)."""
    model = build_backbone("mobilenet_v3_small", len(THREE_CLASSES))
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), len(THREE_CLASSES)).float() * 5)
    return model.eval()


def aliases(mlflow_client) -> dict[str, str]:
    return {a: str(alias_version(mlflow_client, REGISTRY_NAME, a).version)
            for a in (CHAMPION, CHALLENGER, PREVIOUS) if alias_version(mlflow_client, REGISTRY_NAME, a)}


def check_policy(registry_trained) -> None:
    """Champion only for a better model on the same test set; challenger otherwise; promote and rollback."""
    params, splits, _, model = registry_trained
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

    version2 = mlflow_client.get_model_version(REGISTRY_NAME, "2")
    assert version2.tags["test_set_sha256"] == splits.test_hash
    assert float(version2.tags["test_macro_f1"]) == pytest.approx(strong.evaluation.macro_f1, abs=1e-6)
    assert "git_commit" in version2.tags and "champion" in version2.description
    assert version2.tags["git_dirty"] == git_dirty() and version2.tags["model_card"] == "model_card.html"
    assert version2.tags["data_hash"] == f"sha256:{version2.tags[f'data_sha256.{splits.root.as_posix()}']}"

    # The registry's champion is the in-memory model: same logits, and the batch dimension stays dynamic.
    loaded = mlflow.pytorch.load_model(f"models:/{REGISTRY_NAME}@{CHAMPION}", map_location="cpu")
    for batch in (splits.test.x[:1], splits.test.x):
        np.testing.assert_allclose(predict_logits(loaded, batch), predict_logits(model, batch), atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{REGISTRY_NAME}@{CHAMPION}")
    assert pyfunc.predict(splits.test.x[:5].numpy()).shape == (5, len(THREE_CLASSES))

    assert promote(mlflow_client, REGISTRY_NAME, "3", "line trial approved") == "2"
    assert aliases(mlflow_client) == {CHAMPION: "3", PREVIOUS: "2"}
    assert mlflow_client.get_model_version(REGISTRY_NAME, "3").tags["promotion_reason"].endswith("line trial approved")
    assert rollback(mlflow_client, REGISTRY_NAME, "false rejects on line 2") == ("3", "2")
    assert aliases(mlflow_client) == {CHAMPION: "2", PREVIOUS: "3"}
    assert "false rejects" in mlflow_client.get_model_version(REGISTRY_NAME, "2").tags["rollback_reason"]
    assert [r["version"] for r in list_versions(mlflow_client, REGISTRY_NAME)] == ["1", "2", "3"]  # nothing deleted


def test_registry_policy_on_a_sqlite_store(registry_trained, mlflow_store):
    check_policy(registry_trained)


def test_champion_is_re_evaluated_on_a_different_test_set(registry_trained, mlflow_store):
    params, splits, other_splits, model = registry_trained
    assert other_splits.test_hash != splits.test_hash
    log_and_register(model, splits, params, "real_only")
    weak, reg = log_and_register(constant_model(2), other_splits, params, "real_only")
    on_new_set = evaluate(model, other_splits.test, len(THREE_CLASSES)).macro_f1
    assert "re-evaluated" in reg.reason
    assert reg.champion_value == pytest.approx(on_new_set)
    assert reg.alias == (CHAMPION if weak.evaluation.macro_f1 > on_new_set else CHALLENGER)
    tag = client().get_model_version(REGISTRY_NAME, "2").tags["champion_v1_macro_f1_on_this_test_set"]
    assert float(tag) == pytest.approx(on_new_set, abs=1e-6)


def card_of(mlflow_client, version: str) -> str:
    mv = mlflow_client.get_model_version(REGISTRY_NAME, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=mv.tags["model_card"])
    return Path(path).read_text()


def test_every_registered_version_has_a_self_contained_model_card(registry_trained, mlflow_store, tmp_path):
    params, splits, _, model = registry_trained
    grids = tmp_path / "grids"
    grids.mkdir()
    Image.new("RGB", (8, 4), "red").save(grids / "crazing.png")  # one class with a grid, two without
    fid_report = tmp_path / "fid_per_class.json"
    fid_report.write_text(json.dumps({"feature_net": "surface", "per_class": {
        c: {"fid_surface": 10.0 + i + 0.123456, "n_synthetic": 40} for i, c in enumerate(THREE_CLASSES)}}))
    result, reg = log_and_register(model, splits, params, "real_only", fid_report=fid_report, grids_dir=grids)
    mlflow_client = client()
    mv = mlflow_client.get_model_version(REGISTRY_NAME, reg.version)
    card = card_of(mlflow_client, reg.version)
    assert mv.tags["model_card"] == "model_card.html" and "model_card.html" in mv.description
    assert mv.tags["feature_net"] == "surface"  # named by the evaluate report (metrics/fid.json has the means)
    ev = result.evaluation
    assert f"{ev.accuracy:.4f}" in card and f"{ev.macro_f1:.4f}" in card
    for cls, p, r in zip(THREE_CLASSES, ev.precision, ev.recall, strict=True):
        assert f"<td>{cls}</td><td>{p:.3f}</td><td>{r:.3f}</td>" in card
    for row in ev.confusion.tolist():
        assert "".join(f"<td>{n}</td>" for n in row) in card  # each confusion row, as counts
    assert "11.1235" in card and "12.1235" in card  # FID per class from the evaluate report
    assert card.count("data:image/png;base64,") == 1 and "scratches: no grid" in card
    assert "first registered version" in card and "@champion" in card
    assert mv.tags["test_set_sha256"] in card and mv.tags["git_commit"] in card
    assert "src=\"http" not in card and "<link" not in card  # self-contained: nothing to fetch


def test_promotion_needs_a_card_and_the_same_test_set(registry_trained, mlflow_store, tmp_path):
    params, splits, other_splits, model = registry_trained
    mlflow_client = client()
    log_and_register(model, splits, params, "real_only")  # v1: champion, with its card
    # v2: registered by hand (as before model cards existed): same test set, no card
    source = mlflow_client.get_model_version(REGISTRY_NAME, "1").source
    mlflow.register_model(source, REGISTRY_NAME, tags={"test_set_sha256": splits.test_hash})
    with pytest.raises(RegistryError, match=r"v2 has no model card"):
        promote(mlflow_client, REGISTRY_NAME, "2", "looks fine")
    # v3: a card, but evaluated on another test set than the champion's
    _, reg3 = log_and_register(constant_model(0), other_splits, params, "real_only")
    assert reg3.alias == CHALLENGER  # the premise: v3 is not champion already
    with pytest.raises(RegistryError, match=r"v3 was tested on test set .* not comparable"):
        promote(mlflow_client, REGISTRY_NAME, "3", "looks fine")
    assert aliases(mlflow_client)[CHAMPION] == "1"

    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    refused = run_cli(["stablesdg", "registry", "promote", "3", "--reason", "x", "--name", REGISTRY_NAME], tmp_path, env,
                      check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr
    run_cli(["stablesdg", "registry", "promote", "3", "--force", "--reason", "new test set approved by QA",
             "--name", REGISTRY_NAME], tmp_path, env)
    assert aliases(client()) == {CHAMPION: "3", PREVIOUS: "1"}
    forced = client().get_model_version(REGISTRY_NAME, "3").tags["forced_promotion"]
    assert "new test set approved by QA" in forced and "not comparable" in forced
    assert "forced_promotion" not in client().get_model_version(REGISTRY_NAME, "1").tags


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


def test_registry_through_a_real_mlflow_server(registry_trained, mlflow_server, tmp_path):
    check_policy(registry_trained)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    listing = run_cli(["stablesdg", "registry", "list", "--name", REGISTRY_NAME], REPO_ROOT, env).stdout
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert set(rows) == {"1", "2", "3"} and "champion" in rows["2"] and "previous-champion" in rows["3"]
    run_cli(["stablesdg", "registry", "promote", "3", "--reason", "approved in review", "--name", REGISTRY_NAME],
            REPO_ROOT, env)
    assert aliases(client()) == {CHAMPION: "3", PREVIOUS: "2"}
    shown = run_cli(["stablesdg", "registry", "show", "3", "--name", REGISTRY_NAME], REPO_ROOT, env).stdout
    assert "approved in review" in shown and '"champion"' in shown
    run_cli(["stablesdg", "registry", "rollback", "--reason", "drift", "--name", REGISTRY_NAME], REPO_ROOT, env)
    assert aliases(client())[CHAMPION] == "2"
