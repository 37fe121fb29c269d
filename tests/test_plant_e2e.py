"""The plant loop of issue 25 end to end, in one slow test on real services:

train (the engineer: v1 registered, `challenger` awaiting the approver) -> promote (the approver) -> export ->
`stablesdg-line pull` into a "line" folder -> `stablesdg-line watch --once` classifies a drop folder and keeps
the unsure images (`--review-below`) in a review folder -> a person's labels.csv -> `stablesdg data
review-import` -> `dvc add` + `dvc repro` -> v2 registered (its card has the line-image section) -> promoted ->
exported -> `pull` switches to v2.

Services: a shared registry of its own from tests/registry_services.py (`plant_registry`): a real PostgreSQL
15 cluster (initdb / pg_ctl in a temp folder) behind a real `mlflow server --app-name basic-auth` with proxied
artifacts on 127.0.0.1, and the plant's accounts: erin (engineer) runs the pipeline, ada (approver) promotes,
line1 (read-only) pulls. The pipeline is this repo's dvc.yaml in a temporary git + DVC repo (conftest
`make_project`), two classes, the smallest params that train (conftest `small_params`). Measured: 903 s on
2 cores shared with another `dvc repro` (each `dvc repro train` about 6-7 min).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from conftest import make_project, run_cli, small_params
from registry_services import EXPERIMENT, MODEL, plant_registry

from stablesdg.demo import demo_image

pytest.importorskip("stablesdg_line.pull", reason="needs the line runtime: pip install -e ./deploy")

pytestmark = pytest.mark.slow

CLASSES = ["crazing", "scratches"]
DROP_PER_CLASS = 6


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def drop_images(drop: Path) -> dict[str, str]:
    """New images on the line (another seed than the source's demo images): file name -> true class."""
    drop.mkdir(parents=True)
    truth = {}
    for cls in CLASSES:
        for i in range(DROP_PER_CLASS):
            name = f"{cls}-{i:02d}.png"
            demo_image(cls, 500 + i, seed=11, size=64).save(drop / name)
            truth[name] = cls
    return truth


def threshold(confidences: list[float]) -> float:
    """A --review-below that keeps about half: between the two middle distinct confidences (all when equal)."""
    distinct = sorted(set(confidences))
    if len(distinct) < 2:
        return distinct[0] + 1e-6
    mid = len(distinct) // 2
    return (distinct[mid - 1] + distinct[mid]) / 2


def summary(root: Path) -> dict:
    return json.loads((root / "reports/train/summary.json").read_text())


def train_and_register(root: Path, engineer: dict, approver: dict) -> dict:
    """`dvc repro train` as the engineer, then the approver promotes the new version and the engineer exports it
    (export logs the ONNX and tags the version with onnx_sha256, what the line pulls by)."""
    run_cli(["dvc", "repro", "train"], root, engineer)
    report = summary(root)
    registered = report["registered"]
    assert registered["alias"] == "challenger", registered  # the engineer may not move champion
    out = run_cli(["stablesdg", "registry", "promote", registered["version"], "--name", MODEL,
                   "--reason", "e2e: approved in review"], root, approver)
    assert f"v{registered['version']} is champion" in out.stdout
    run_cli(["dvc", "repro", "--force", "--single-item", "export"], root, engineer)
    export = json.loads((root / "reports/export/export.json").read_text())
    assert export["model_version"] == registered["version"]
    return report


def pull(root: Path, registry, line: dict, dest: Path) -> str:
    return run_cli(["stablesdg-line", "pull", "--registry", registry.uri, "--model", MODEL, "--alias", "champion",
                    "--dest", str(dest)], root, line).stdout


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry of its own (not the session's, where other tests register versions and move champion)."""
    with plant_registry(tmp_path_factory.mktemp("plant-registry")) as server:
        yield server


@pytest.mark.timeout(2400)  # two `dvc repro train` runs on 2 shared cores (pyproject's default is 600 s)
def test_train_promote_pull_review_import_retrain_pull(registry, tmp_path, monkeypatch):
    root = make_project(tmp_path / "plant", small_params(
        CLASSES, data={"source": "data/source"}, tracking={"experiment": EXPERIMENT, "registered_model": MODEL}))
    engineer, approver, line = (registry.env(u, registry.password(u)) for u in ("erin", "ada", "line1"))

    # The source folder: demo images, versioned with `dvc add` (review-import adds to it).
    run_cli(["stablesdg", "data", "demo", "--out", "data/source"], root)
    run_cli(["dvc", "add", "data/source"], root)
    run_cli(["git", "add", "-A"], root)
    run_cli(["git", "commit", "-qm", "source"], root)

    first = train_and_register(root, engineer, approver)
    v1 = first["registered"]["version"]
    assert v1 == "1" and "awaiting the approver" in first["registered"]["reason"]
    assert first["line_images"] == 0

    # The line PC follows the champion.
    models = root / "line" / "models"
    out = pull(root, registry, line, models)
    assert f"none -> v{v1} " in out
    current = json.loads((models / "current.json").read_text())
    assert current["version"] == v1 and sha(models / "current.onnx") == current["sha256"]

    # It classifies a drop folder and keeps the images it is unsure of.
    drop, review = root / "line" / "drop", root / "line" / "review"
    truth = drop_images(drop)
    rows = [json.loads(r) for r in run_cli(["stablesdg-line", "classify", str(models / "current.onnx"), str(drop)],
                                           root).stdout.splitlines()]
    confidences = {Path(r["file"]).name: r["confidence"] for r in rows}
    assert set(confidences) == set(truth)
    below = threshold(list(confidences.values()))
    run_cli(["stablesdg-line", "watch", str(models / "current.onnx"), str(drop), "--results",
             str(root / "line" / "results.jsonl"), "--once", "--settle-seconds", "0.05",
             "--incomplete-grace-seconds", "0", "--review-dir", str(review), "--review-below", f"{below:.6f}",
             "--line-id", "line-1"], root)
    sidecars = [json.loads(p.read_text()) for p in sorted(review.glob("*.json"))]
    kept = {s["source_file"]: s for s in sidecars}
    assert set(kept) == {name for name, c in confidences.items() if c < float(f"{below:.6f}")}
    assert len(kept) > 0 and all(s["model_version"] == v1 and s["line"] == "line-1" for s in sidecars)

    # A person labels them (the truth), review-import adds them to the source, DVC versions it, dvc repro.
    with (review.parent / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows([s["image"], truth[name]] for name, s in kept.items())
    out = run_cli(["stablesdg", "data", "review-import", str(review), "--labels", str(review.parent / "labels.csv")],
                  root)
    assert f"{len(kept)} added" in out.stdout and "0 refused" in out.stdout
    run_cli(["dvc", "add", "data/source"], root)
    run_cli(["git", "add", "-A"], root)
    run_cli(["git", "commit", "-qm", "line-1's reviewed images"], root)

    second = train_and_register(root, engineer, approver)
    v2 = second["registered"]["version"]
    assert int(v2) == int(v1) + 1
    imported = Counter(truth[name] for name in kept)
    assert second["line_images"] == len(kept)
    best = second[second["registered"]["variant"]]["line_images"]
    assert {cls: rec["images"] for cls, rec in best["per_class"].items()} == {c: imported[c] for c in CLASSES}
    assert second["test_set_sha256"] == first["test_set_sha256"], "line images must not move the test split"

    # The line switches to v2; v1 stays as previous.onnx.
    previous_sha = sha(models / "current.onnx")
    out = pull(root, registry, line, models)
    assert f"v{v1} (" in out and f"-> v{v2} (" in out
    current = json.loads((models / "current.json").read_text())
    for key, value in line.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(registry.uri)
    client = mlflow.MlflowClient(registry.uri, registry.uri)
    version = client.get_model_version(MODEL, v2)
    assert current["version"] == v2 and sha(models / "current.onnx") == version.tags["onnx_sha256"]
    assert sha(models / "previous.onnx") == previous_sha

    # v2's model card (read as the line account) has the line-image section with the imported counts.
    card = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.html",
                                                    dst_path=str(tmp_path / "card"))).read_text()
    assert f"{len(kept)} images the line was unsure of came back labelled" in card
    for cls in CLASSES:
        assert f"<td>{cls}</td><td>{imported[cls]}</td>" in card
    assert "line images per class" in card  # the embedded plot
