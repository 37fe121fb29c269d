"""The data stages under real DVC in a temporary git repo, tracked in a real MLflow sqlite store."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import yaml
from conftest import REPO_ROOT, make_project, run_cli

from stablesdg.utils import sha256_tree


def _small_params() -> str:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update({"image_size": 64, "k_shot": 3, "val_per_class": 2, "test_per_class": 3})
    raw["data"]["demo"] = {"per_class": 10, "size": 64}
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("proj"), _small_params())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    first = run_cli(["dvc", "repro", "ingest"], root, env)
    return root, env, first


def test_repro_runs_data_stages_then_nothing_changes(project):
    root, env, first = project
    assert "Running stage 'demo'" in first.stdout and "Running stage 'ingest'" in first.stdout
    assert len(list((root / "data/processed/images").rglob("*.png"))) == 60
    assert (root / "reports/data/contact_sheet.png").stat().st_size > 1000
    again = run_cli(["dvc", "repro", "ingest"], root, env)
    assert "Running stage" not in again.stdout
    assert "didn't change" in again.stdout or "up to date" in again.stdout


def test_params_change_reruns_only_affected_stage(project, tmp_path):
    root, env, _ = project
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, symlinks=True)
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    raw["data"]["k_shot"] = 4
    (clone / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run_cli(["dvc", "repro", "ingest"], clone, {"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"})
    assert "Stage 'demo' didn't change" in out.stdout
    assert "Running stage 'ingest'" in out.stdout


def test_push_pull_through_local_remote_restores_identical_data(project, tmp_path):
    root, env, _ = project
    remote = tmp_path / "remote"
    run_cli(["dvc", "remote", "add", "-f", "-d", "localremote", str(remote)], root, env)
    run_cli(["dvc", "push"], root, env)
    before = {p: sha256_tree(root / p) for p in ("data/demo", "data/processed")}
    for p in before:
        shutil.rmtree(root / p)
    shutil.rmtree(root / ".dvc" / "cache")
    run_cli(["dvc", "pull", "demo", "ingest"], root, env)
    assert {p: sha256_tree(root / p) for p in before} == before
    status = run_cli(["dvc", "status", "demo", "ingest"], root, env)
    assert "up to date" in status.stdout


def test_ingest_run_is_tracked_with_params_commit_and_data_hash(project):
    root, env, _ = project
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["stablesdg"], filter_string="tags.stage = 'ingest'",
                              output_format="list")
    assert len(runs) >= 1
    run = runs[-1]
    assert run.data.params["data.k_shot"] == "3"
    assert run.data.params["adapt.lora.rank"] == "4"
    head = run_cli(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert run.data.tags["git_commit"] == head
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    demo_md5 = lock["stages"]["demo"]["outs"][0]["md5"]
    assert run.data.tags["dvc_hash.data/demo"] == demo_md5
    assert run.data.metrics["images"] == 60
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "quarantine.json", "manifest.csv"} <= artifacts
