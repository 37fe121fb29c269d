"""End to end: the whole `dvc repro` in a temporary git repo with small params (marked slow, ~10 min on 2 cores).

What must hold: every stage runs and writes its declared outputs; a second `dvc repro` does nothing; a change to
one class's params re-runs only that class's adapt/search/generate (plus what consumes all classes); a change
to the classifier params re-runs only training (and export when the champion changed); the champion is
registered and exported to ONNX.
"""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import pytest
import yaml
from conftest import make_project, run_cli, small_params

pytestmark = pytest.mark.slow

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
PER_CLASS_STAGES = ("adapt", "search", "generate")


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_param(root, dotted: str, value) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("e2e"), small_params())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    first = run_cli(["dvc", "repro"], root, env)
    return root, env, first


def test_full_repro_runs_every_stage_and_writes_outputs(project):
    root, _, first = project
    expected = {"demo", "ingest", "features", "evaluate", "train", "export"} | {
        f"{stage}@{cls}" for stage in PER_CLASS_STAGES for cls in CLASSES}
    assert _ran(first.stdout) == expected
    for cls in CLASSES:
        assert (root / f"models/adapters/{cls}/learned_embeds.safetensors").stat().st_size > 0
        assert (root / f"models/adapters/{cls}/pytorch_lora_weights.safetensors").stat().st_size > 0
        assert len(list((root / f"data/synthetic/{cls}").glob("*.png"))) == 6
        trials = json.loads((root / f"reports/search/{cls}.json").read_text())["trials"]
        assert len(trials) == 2
    fid = json.loads((root / "reports/evaluate/fid_per_class.json").read_text())
    assert set(fid["per_class"]) == set(CLASSES) and fid["mean"]["fid_surface"] >= 0
    assert json.loads((root / "metrics/fid.json").read_text())["fid"] >= 0
    train = json.loads((root / "reports/train/summary.json").read_text())
    assert 0.0 <= train["real_only"]["accuracy"] <= 1.0
    assert train["real_only"]["test_set_sha256"] == train["real_plus_synthetic"]["test_set_sha256"]
    assert 0.0 <= json.loads((root / "metrics/train.json").read_text())["acc"] <= 1.0
    export = json.loads((root / "reports/export/export.json").read_text())
    assert export["fp32"]["parity"]["top1_agreement"] == 1.0
    assert json.loads((root / "metrics/export.json").read_text())["int8"] == export["int8"]["decision"]
    assert (root / "models/classifier.onnx").stat().st_size > 10_000


def test_second_repro_does_nothing(project):
    root, env, _ = project
    again = run_cli(["dvc", "repro"], root, env)
    assert _ran(again.stdout) == set()
    assert "up to date" in run_cli(["dvc", "status"], root, env).stdout


def test_champion_registered_and_matches_exported_model(project):
    root, env, _ = project
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("steel-defect-classifier", "champion")
    export = json.loads((root / "reports/export/export.json").read_text())
    assert str(export["model_version"]) == str(champion.version)
    # the shipped file traces back to this repository: `stablesdg provenance` finds no mismatch
    run_cli(["stablesdg", "provenance", "models/classifier.onnx"], root, env)


def test_one_class_param_change_reruns_only_that_class(project, tmp_path):
    root, env, _ = project
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, symlinks=True)
    _set_param(clone, "classes.crazing", {"initializer": "crack", "lora_steps": 5})
    out = run_cli(["dvc", "repro"], clone, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"})
    ran = _ran(out.stdout)
    assert {f"{stage}@crazing" for stage in PER_CLASS_STAGES} <= ran
    assert not {f"{stage}@{cls}" for stage in PER_CLASS_STAGES for cls in CLASSES if cls != "crazing"} & ran
    # ingest lists `classes` (it needs the names) and so runs again, but writes identical data: nothing that
    # reads the data (features, the other classes) runs.
    assert "demo" not in ran and "features" not in ran
    assert "up to date" in run_cli(["dvc", "status", "features"], clone, env).stdout


def test_classifier_param_change_reruns_only_train_and_export(project, tmp_path):
    root, env, _ = project
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, symlinks=True)
    _set_param(clone, "classifier.learning_rate", 0.002)
    before = json.loads((clone / "reports/train/champion.json").read_text())
    out = run_cli(["dvc", "repro"], clone, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"})
    # export follows the champion (a param), so it re-runs only when the new version took `champion`
    changed = json.loads((clone / "reports/train/champion.json").read_text()) != before
    assert _ran(out.stdout) == ({"train", "export"} if changed else {"train"})


def test_fresh_clone_must_train_before_it_exports(project, tmp_path):
    """A clone carries the committed lock, metrics and reports but neither the DVC cache nor the MLflow store.
    `train` must be due there (its weights are a cached output): were it up to date, `dvc repro` would skip it
    and `export` would find no champion in the clone's empty registry."""
    root, env, _ = project
    run_cli(["git", "add", "-A"], root)
    run_cli(["git", "commit", "-qm", "pipeline results"], root)
    clone = tmp_path / "fresh"
    run_cli(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert (clone / "metrics/train.json").exists() and not (clone / "models/classifier").exists()
    status = run_cli(["dvc", "status", "train"], clone, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{clone}/m.db"})
    assert "train:" in status.stdout and "models/classifier" in status.stdout


def _out_hashes(root) -> dict[str, str]:
    """Every out of every stage in dvc.lock -> its md5 (a folder's md5 covers each file in it)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}


def _without_registry(record):
    """A train summary without what the tracking server assigns: run ids and the `registered` decision."""
    if isinstance(record, dict):
        return {k: _without_registry(v) for k, v in record.items() if k not in ("run_id", "registered")}
    return [_without_registry(v) for v in record] if isinstance(record, list) else record


def test_forced_repro_on_one_machine_gives_byte_identical_outputs(project, tmp_path):
    """Issue 26: the same params, code and thread count give the same bytes. Everything re-runs in a copy
    (`dvc repro -f`) and every out's md5 must equal the first run's, except the MLflow-facing records that carry
    run ids or wall-clock times (listed, and nothing else)."""
    root, env, _ = project
    clone = tmp_path / "again"
    shutil.copytree(root, clone, symlinks=True)
    run_cli(["dvc", "repro", "-f"], clone, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"})
    first, second = _out_hashes(root), _out_hashes(clone)
    assert first.keys() == second.keys()
    differ = sorted(p for p in first if first[p] != second[p])
    # the copy's registry already holds the first run's version, so the second registers the next one, and the
    # exported files carry that version number (metadata) and the export's timings
    registry_facing = {"reports/train/champion.json", "reports/export/export.json", "metrics/export.json",
                       "models/classifier.onnx", "models/quantized", "reports/base/base.json",
                       "reports/train/summary.json"}
    assert set(differ) <= registry_facing, f"outputs that changed between two identical runs: {differ}"
    # the train summary differs only where MLflow speaks: its run ids and the registration (v1 champion, then v2)
    first_summary, second_summary = (_without_registry(json.loads((r / "reports/train/summary.json").read_text()))
                                     for r in (root, clone))
    assert first_summary == second_summary
