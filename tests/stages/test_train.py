"""Stage `train`: both variants trained and compared on the same test set, tracked in MLflow and registered with a
model card; a missing synthetic set skips the augmented variant with a reason; repeats retrain per seed; line
images imported by review-import are scored, plotted and put on the card."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import THREE_CLASSES, classifier_params
from PIL import Image

from stablesdg.classifier import evaluate, load_images, load_weights, train_classifier
from stablesdg.comparison import load_splits, repeated
from stablesdg.config import DataConfig
from stablesdg.data import LINE_SPLIT, ingest, split_paths
from stablesdg.demo import demo_image, write_demo_dataset
from stablesdg.registry import CHAMPION, alias_version, client
from stablesdg.review_import import Labelled, import_reviewed
from stablesdg.stages.train import run_training, train_command
from stablesdg.viz import LINE_IMAGES_PLOT_SIZE


def test_train_stage_compares_both_variants_on_the_same_test_set(classifier_data, mlflow_store, tmp_path):
    processed, synthetic = classifier_data
    params = classifier_params()
    summary = run_training(params, processed, synthetic, tmp_path / "reports", weights_dir=tmp_path / "weights")

    real, augmented = summary["real_only"], summary["real_plus_synthetic"]
    n_test = 3 * (10 - 4 - 2)
    assert real["n_train_synthetic"] == 0 and augmented["n_train_synthetic"] == 12
    # classifier.baseline_steps: equal (default): the baseline's 12 real images, repeated, take as many
    # optimizer steps as the 12 real + 12 synthetic ones
    assert real["n_train_real"] == augmented["n_train_real"] == 12
    assert real["epoch_size"] == augmented["epoch_size"] == 24
    assert real["test_set_sha256"] == augmented["test_set_sha256"] == summary["test_set_sha256"]
    assert summary["gain"]["macro_f1"] == pytest.approx(augmented["macro_f1"] - real["macro_f1"])
    assert sum(map(sum, real["confusion_matrix"])) == n_test

    runs = {r.data.tags["variant"]: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if "variant" in r.data.tags}
    assert set(runs) == {"real_only", "real_plus_synthetic"}
    assert {r.data.tags["test_set_sha256"] for r in runs.values()} == {summary["test_set_sha256"]}
    for variant, run in runs.items():
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_macro_f1")
        assert len(history) == summary[variant]["epochs_run"]
        assert run.data.metrics["test_macro_f1"] == pytest.approx(summary[variant]["macro_f1"])
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "misclassified.png", "preprocess.json"} <= artifacts

    with open(tmp_path / "reports" / "confusion_real_only.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test and {r["actual"] for r in rows} == set(THREE_CLASSES)
    # no line images imported: nothing scored, no plot drawn
    assert summary["line_images"] == 0 and real["line_images"] is None and augmented["line_images"] is None
    assert not list((tmp_path / "reports").glob("line_images*"))

    registered = summary["registered"]
    champion = alias_version(client(), params.tracking.registered_model, CHAMPION)
    assert registered["alias"] == CHAMPION and str(champion.version) == registered["version"] == "1"
    assert champion.tags["test_set_sha256"] == summary["test_set_sha256"]
    assert champion.tags["variant"] == registered["variant"]
    assert "| accuracy |" in champion.description

    # The DVC-versioned weights are the registered models: same test metrics, same logits as MLflow's copy.
    test = load_splits(processed, synthetic, params).test
    for variant in ("real_only", "real_plus_synthetic"):
        model, spec = load_weights(tmp_path / "weights" / f"{variant}.safetensors")
        assert spec.class_names == THREE_CLASSES and spec.input_size == (48, 48)
        assert evaluate(model, test, len(THREE_CLASSES)).metric("accuracy") == pytest.approx(summary[variant]["accuracy"])
    registered_model = mlflow.pytorch.load_model(f"models:/{params.tracking.registered_model}@{CHAMPION}").eval()
    shipped, _ = load_weights(tmp_path / "weights" / f"{registered['variant']}.safetensors")
    x = test.x[:4]
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), registered_model(x), rtol=0, atol=1e-6)


def test_augmented_variant_is_skipped_with_a_reason_without_synthetic_images(classifier_data, mlflow_store, tmp_path):
    processed, _ = classifier_data
    stale = tmp_path / "w" / "real_plus_synthetic.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier run")
    summary = run_training(classifier_params(epochs=1), processed, tmp_path / "none", tmp_path / "r", register=False,
                           weights_dir=tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["real_only.safetensors"]
    assert summary["real_plus_synthetic"]["skipped"] is True
    assert "no synthetic images" in summary["real_plus_synthetic"]["reason"]
    assert summary["gain"] is None


def test_repeats_retrain_both_variants_with_consecutive_seeds(classifier_data, mlflow_store, tmp_path):
    processed, synthetic = classifier_data
    params = classifier_params(epochs=2, repeats=3)
    summary = run_training(params, processed, synthetic, tmp_path / "r", register=False)
    rep = summary["repeats"]
    assert rep["seeds"] == [5, 6, 7]
    for variant in ("real_only", "real_plus_synthetic"):
        assert rep[variant]["macro_f1"][0] == pytest.approx(summary[variant]["macro_f1"])
        assert len(rep[variant]["accuracy"]) == 3
    gains = np.subtract(rep["real_plus_synthetic"]["macro_f1"], rep["real_only"]["macro_f1"])
    assert rep["gain_macro_f1_mean"] == pytest.approx(gains.mean())
    assert rep["gain_macro_f1_std"] == pytest.approx(gains.std(ddof=1))
    # Seed 7's real-only number is what a direct training with seed 7 gives.
    splits = load_splits(processed, synthetic, params)
    direct = train_classifier(repeated(splits.train, 24), splits.val, splits.spec, params.classifier, 7)
    assert evaluate(direct.model, splits.test, len(THREE_CLASSES)).macro_f1 == pytest.approx(rep["real_only"]["macro_f1"][2])
    parent = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if "variant" not in r.data.tags]
    assert parent[0].data.metrics["gain_macro_f1_mean"] == pytest.approx(rep["gain_macro_f1_mean"])


def test_registered_version_has_a_model_card_with_the_declared_figures(classifier_data, mlflow_store, tmp_path):
    """`stablesdg train` end to end: metrics/train.json (few figures), reports/train/summary.json (all of them),
    and a model card on the registered version that holds every figure of both."""
    processed, synthetic = classifier_data
    raw = {"seed": 5, "classes": {c: {"initializer": "line"} for c in THREE_CLASSES},
           "classifier": {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 1, "batch_size": 8,
                          "repeats": 2, "synthetic_use": "append"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    grids = tmp_path / "grids"
    grids.mkdir()
    for cls in THREE_CLASSES:
        Image.new("RGB", (16, 8), "gray").save(grids / f"{cls}.png")
    result = CliRunner().invoke(train_command, [
        "--params", str(tmp_path / "params.yaml"), "--processed", str(processed), "--synthetic", str(synthetic),
        "--fid", str(tmp_path / "none.json"), "--fid-report", str(tmp_path / "none.json"), "--grids", str(grids),
        "--metrics", str(tmp_path / "metrics" / "train.json"), "--reports", str(tmp_path / "reports"),
        "--weights", str(tmp_path / "weights")])
    assert result.exit_code == 0, result.output
    declared = json.loads((tmp_path / "metrics" / "train.json").read_text())
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert set(declared) == {"acc", "f1", "gain", "gain_sd"}
    rep = summary["repeats"]
    figures = {"acc": summary["real_plus_synthetic"]["accuracy"], "f1": summary["real_plus_synthetic"]["macro_f1"],
               "gain": rep["gain_macro_f1_mean"], "gain_sd": rep["gain_macro_f1_std"]}
    assert declared == {k: round(v, 3) for k, v in figures.items()}

    champion = alias_version(client(), "steel-defect-classifier", CHAMPION)
    assert champion.tags["model_card"] == "model_card.html" and "model_card.html" in champion.description
    assert champion.tags["gain_macro_f1_mean"] == f"{summary['repeats']['gain_macro_f1_mean']:+.6f}"
    card = Path(mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="model_card.html"))
    text = card.read_text()
    # every declared figure, at the card's 4 decimals (metrics/train.json rounds them to 3)
    assert f"{rep['gain_macro_f1_mean']:+.4f}" in text and f"{rep['gain_macro_f1_std']:.4f}" in text
    for variant in ("real_only", "real_plus_synthetic"):
        for figure in ("accuracy", "macro_f1"):
            assert f"{summary[variant][figure]:.4f}" in text
        for cls, pr in summary[variant]["per_class"].items():
            assert f"<td>{cls}</td><td>{pr['precision']:.3f}</td><td>{pr['recall']:.3f}</td>" in text
    assert text.count("data:image/png;base64,") == len(THREE_CLASSES)  # the grids; no line-image plot
    assert "No line images in this training data" in text
    assert summary["registered"]["reason"] in text
    size = summary["real_only"]["epoch_size"]  # equal steps: both variants go through as many images an epoch
    assert size == summary["real_plus_synthetic"]["epoch_size"]
    assert f"<td>training images an epoch</td><td>{size}</td><td>{size}</td>" in text


LINE_COUNTS = {"crazing": 3, "patches": 1, "scratches": 0}


@pytest.fixture(scope="module")
def line_data(tmp_path_factory) -> Path:
    """A real source folder that got labelled line images through review-import (LINE_COUNTS per class), then a
    real ingest: the processed data has a `line` split."""
    root = tmp_path_factory.mktemp("linedata")
    write_demo_dataset(root / "source", THREE_CLASSES, 10, 64, seed=0)
    (root / "review").mkdir()
    items = []
    for cls, n in LINE_COUNTS.items():
        for i in range(n):
            demo_image(cls, 100 + i, seed=0, size=64).save(root / "review" / f"{cls}{i}.png")
            items.append(Labelled(root / "review" / f"{cls}{i}.png", cls, {}))
    assert len(import_reviewed(items, root / "source", THREE_CLASSES).added) == sum(LINE_COUNTS.values())
    cfg = DataConfig(image_size=64, k_shot=4, val_per_class=2, test_per_class=4)
    ingest(root / "source", root / "processed", cfg, THREE_CLASSES, seed=0)
    return root / "processed"


def test_line_images_are_scored_plotted_and_on_the_card(line_data, classifier_data, mlflow_store, tmp_path):
    reports = tmp_path / "reports"
    params = classifier_params(epochs=1)
    summary = run_training(params, line_data, tmp_path / "none", reports, weights_dir=tmp_path / "w")
    assert summary["line_images"] == sum(LINE_COUNTS.values())
    scored = summary["real_only"]["line_images"]
    assert {cls: rec["images"] for cls, rec in scored["per_class"].items()} == LINE_COUNTS

    # the numbers are the shipped model's own predictions on the line split, class by class
    model, spec = load_weights(tmp_path / "w" / "real_only.safetensors")
    for label, cls in enumerate(THREE_CLASSES):
        paths = split_paths(line_data, cls, LINE_SPLIT)
        rec = scored["per_class"][cls]
        if not paths:
            assert rec == {"images": 0, "correct": 0, "accuracy": None}
            continue
        predictions = evaluate(model, load_images(paths, [label] * len(paths), spec), len(THREE_CLASSES)).predictions
        assert rec["correct"] == int((predictions == label).sum())
        assert rec["accuracy"] == pytest.approx(rec["correct"] / len(paths))

    plot = reports / "line_images_real_only.png"
    assert Image.open(plot).size == LINE_IMAGES_PLOT_SIZE
    champion = alias_version(client(), params.tracking.registered_model, CHAMPION)
    run_artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(champion.run_id)}
    assert {"line_images.png", "confusion_matrix.png"} <= run_artifacts
    assert mlflow.get_run(champion.run_id).data.metrics["line_images"] == sum(LINE_COUNTS.values())
    text = Path(mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="model_card.html")).read_text()
    for cls, rec in scored["per_class"].items():
        accuracy = "-" if rec["accuracy"] is None else f"{rec['accuracy']:.4f}"
        assert f"<td>{cls}</td><td>{rec['images']}</td><td>{rec['correct']}</td><td>{accuracy}</td>" in text
    # the card embeds the very plot written to reports/train (no grids were given: it is the only image)
    assert text.count("data:image/png;base64,") == 1
    assert base64.b64encode(plot.read_bytes()).decode() in text
    assert "line images (review-import, trained on): 4," in champion.description

    processed, _ = classifier_data  # the next training without line images draws none and leaves no stale plot
    again = run_training(params, processed, tmp_path / "none", reports, register=False)
    assert again["line_images"] == 0 and not plot.exists()
