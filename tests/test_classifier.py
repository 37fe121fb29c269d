"""Classifier training on real (+ synthetic) images: backbones, metrics, determinism and the train stage."""

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
from conftest import make_processed
from PIL import Image

from stablesdg.classifier import (
    PretrainedWeightsError,
    augment_batch,
    build_backbone,
    classification_metrics,
    evaluate,
    load_images,
    load_weights,
    make_spec,
    sample_synthetic,
    train_classifier,
    weights_file_name,
)
from stablesdg.comparison import load_splits, repeated, source_names, variant_train_set
from stablesdg.config import BACKBONES, DataConfig, parse_params
from stablesdg.data import LINE_SPLIT, ingest, split_paths
from stablesdg.demo import demo_image, write_demo_dataset
from stablesdg.registry import CHAMPION, alias_version, client
from stablesdg.review_import import Labelled, import_reviewed
from stablesdg.stages.train import run_training, train_command
from stablesdg.viz import LINE_IMAGES_PLOT_SIZE

CLASSES = ["crazing", "patches", "scratches"]


def classifier_params(**classifier) -> object:
    # these synthetic folders are demo images without a generate manifest: appended, unless a test says replace
    cfg = {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 3, "batch_size": 8,
           "learning_rate": 0.003, "patience": 3, "repeats": 1, "synthetic_use": "append", **classifier}
    return parse_params({"seed": 5, "classes": {c: {"initializer": "line"} for c in CLASSES}, "classifier": cfg})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real processed splits plus a synthetic folder (demo images of another seed stand in for generated ones)."""
    root = tmp_path_factory.mktemp("clsdata")
    processed = make_processed(root, CLASSES, per_class=10, size=64, k_shot=4)
    write_demo_dataset(root / "synthetic_raw", CLASSES, 6, 64, seed=99)
    synthetic = root / "synthetic"
    for cls in CLASSES:
        (synthetic / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((root / "synthetic_raw" / cls).iterdir())):
            (synthetic / cls / f"{cls}_{i:05d}.png").write_bytes(src.read_bytes())
    return processed, synthetic


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_with_the_class_count(backbone):
    model = build_backbone(backbone, num_classes=6).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 6)


def test_missing_pretrained_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name = weights_file_name("resnet18")
    assert name.startswith("resnet18-") and name.endswith(".pth")
    with pytest.raises(PretrainedWeightsError) as err:
        build_backbone("resnet18", 6, pretrained=True)
    message = str(err.value)
    assert name in message and str(tmp_path / "hub" / "checkpoints") in message and "pretrained: false" in message


def test_pretrained_weights_load_from_weights_path(tmp_path):
    """A local weights file (here: a resnet18 state dict saved under torchvision's file name) is used."""
    reference = build_backbone("resnet18", 1000)
    path = tmp_path / weights_file_name("resnet18")
    torch.save(reference.state_dict(), path)
    model = build_backbone("resnet18", 4, pretrained=True, weights_path=str(tmp_path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 4


def test_classification_metrics_on_a_known_confusion():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0])
    ev = classification_metrics(y_true, y_pred, 3)
    assert ev.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert ev.accuracy == pytest.approx(4 / 6)
    assert ev.precision == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert ev.recall == pytest.approx([2 / 3, 1.0, 0.0])
    f1 = [2 / 3, 0.8, 0.0]
    assert ev.macro_f1 == pytest.approx(np.mean(f1))


def test_augmentation_is_seeded_and_keeps_shape():
    spec = make_spec(CLASSES, classifier_params().classifier)
    x = torch.randn(6, 3, 48, 48)
    a = augment_batch(x, spec, torch.Generator().manual_seed(1))
    b = augment_batch(x, spec, torch.Generator().manual_seed(1))
    c = augment_batch(x, spec, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_synthetic_sample_follows_the_ratio_per_class(data):
    processed, synthetic = data
    paths, labels = sample_synthetic(synthetic, CLASSES, [4, 4, 2], ratio=1.0, seed=1)
    assert [labels.count(i) for i in range(3)] == [4, 4, 2]
    assert all(p.parent.name == CLASSES[label] for p, label in zip(paths, labels, strict=True))
    again, _ = sample_synthetic(synthetic, CLASSES, [4, 4, 2], ratio=1.0, seed=1)
    assert again == paths


def test_training_is_deterministic_and_learns(data):
    processed, synthetic = data
    params = classifier_params(epochs=4)
    splits = load_splits(processed, synthetic, params)
    first = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    second = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = [r.train_loss for r in first.history]
    assert losses[-1] < losses[0]
    assert first.best_epoch == 1 + int(np.argmax([r.val_macro_f1 for r in first.history]))


def test_train_stage_compares_both_variants_on_the_same_test_set(data, mlflow_store, tmp_path):
    processed, synthetic = data
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
    assert len(rows) == n_test and {r["actual"] for r in rows} == set(CLASSES)
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
        assert spec.class_names == CLASSES and spec.input_size == (48, 48)
        assert evaluate(model, test, len(CLASSES)).metric("accuracy") == pytest.approx(summary[variant]["accuracy"])
    registered_model = mlflow.pytorch.load_model(f"models:/{params.tracking.registered_model}@{CHAMPION}").eval()
    shipped, _ = load_weights(tmp_path / "weights" / f"{registered['variant']}.safetensors")
    x = test.x[:4]
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), registered_model(x), rtol=0, atol=1e-6)


def test_epochs_baseline_trains_the_real_images_once_an_epoch(data):
    processed, synthetic = data
    equal, epochs = (classifier_params(baseline_steps=b).classifier for b in ("equal", "epochs"))
    splits = load_splits(processed, synthetic, classifier_params())
    assert len(variant_train_set(splits, "real_only", equal)) == 24
    assert len(variant_train_set(splits, "real_only", epochs)) == 12
    augmented = variant_train_set(splits, "real_plus_synthetic", epochs)
    assert augmented.paths[:12] == splits.train.paths and augmented.paths[12:] == splits.synthetic.paths
    no_synthetic = load_splits(processed, synthetic, classifier_params(synthetic_ratio=0))
    assert variant_train_set(no_synthetic, "real_only", equal).paths == no_synthetic.train.paths


def test_augmented_variant_is_skipped_with_a_reason_without_synthetic_images(data, mlflow_store, tmp_path):
    processed, _ = data
    stale = tmp_path / "w" / "real_plus_synthetic.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier run")
    summary = run_training(classifier_params(epochs=1), processed, tmp_path / "none", tmp_path / "r", register=False,
                           weights_dir=tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["real_only.safetensors"]
    assert summary["real_plus_synthetic"]["skipped"] is True
    assert "no synthetic images" in summary["real_plus_synthetic"]["reason"]
    assert summary["gain"] is None


def test_repeats_retrain_both_variants_with_consecutive_seeds(data, mlflow_store, tmp_path):
    processed, synthetic = data
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
    assert evaluate(direct.model, splits.test, len(CLASSES)).macro_f1 == pytest.approx(rep["real_only"]["macro_f1"][2])
    parent = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if "variant" not in r.data.tags]
    assert parent[0].data.metrics["gain_macro_f1_mean"] == pytest.approx(rep["gain_macro_f1_mean"])


def test_registered_version_has_a_model_card_with_the_declared_figures(data, mlflow_store, tmp_path):
    """`stablesdg train` end to end: metrics/train.json (few figures), reports/train/summary.json (all of them),
    and a model card on the registered version that holds every figure of both."""
    processed, synthetic = data
    raw = {"seed": 5, "classes": {c: {"initializer": "line"} for c in CLASSES},
           "classifier": {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 1, "batch_size": 8,
                          "repeats": 2, "synthetic_use": "append"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    grids = tmp_path / "grids"
    grids.mkdir()
    for cls in CLASSES:
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
    assert text.count("data:image/png;base64,") == len(CLASSES)  # the grids; no line-image plot
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
    write_demo_dataset(root / "source", CLASSES, 10, 64, seed=0)
    (root / "review").mkdir()
    items = []
    for cls, n in LINE_COUNTS.items():
        for i in range(n):
            demo_image(cls, 100 + i, seed=0, size=64).save(root / "review" / f"{cls}{i}.png")
            items.append(Labelled(root / "review" / f"{cls}{i}.png", cls, {}))
    assert len(import_reviewed(items, root / "source", CLASSES).added) == sum(LINE_COUNTS.values())
    cfg = DataConfig(image_size=64, k_shot=4, val_per_class=2, test_per_class=4)
    ingest(root / "source", root / "processed", cfg, CLASSES, seed=0)
    return root / "processed"


def test_line_images_are_scored_plotted_and_on_the_card(line_data, data, mlflow_store, tmp_path):
    reports = tmp_path / "reports"
    params = classifier_params(epochs=1)
    summary = run_training(params, line_data, tmp_path / "none", reports, weights_dir=tmp_path / "w")
    assert summary["line_images"] == sum(LINE_COUNTS.values())
    scored = summary["real_only"]["line_images"]
    assert {cls: rec["images"] for cls, rec in scored["per_class"].items()} == LINE_COUNTS

    # the numbers are the shipped model's own predictions on the line split, class by class
    model, spec = load_weights(tmp_path / "w" / "real_only.safetensors")
    for label, cls in enumerate(CLASSES):
        paths = split_paths(line_data, cls, LINE_SPLIT)
        rec = scored["per_class"][cls]
        if not paths:
            assert rec == {"images": 0, "correct": 0, "accuracy": None}
            continue
        predictions = evaluate(model, load_images(paths, [label] * len(paths), spec), len(CLASSES)).predictions
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

    processed, _ = data  # the next training without line images draws none and leaves no stale plot
    again = run_training(params, processed, tmp_path / "none", reports, register=False)
    assert again["line_images"] == 0 and not plot.exists()


def _with_manifests(processed: Path, synthetic: Path, dest: Path) -> Path:
    """The fixture's synthetic folder plus the manifest the generate stage writes: image i made from train
    image i mod k of its class."""
    from stablesdg.data import split_paths

    for cls in CLASSES:
        (dest / cls).mkdir(parents=True)
        train = split_paths(processed, cls, "train")
        records = []
        for i, src in enumerate(sorted((synthetic / cls).glob("*.png"))):
            (dest / cls / src.name).write_bytes(src.read_bytes())
            records.append({"file": src.name, "source": train[i % len(train)].name})
        (dest / cls / "manifest.json").write_text(json.dumps({"images": records}))
    return dest


def test_replace_swaps_real_images_for_their_own_variants_at_equal_steps(data, tmp_path):
    processed, synthetic = data
    synthetic = _with_manifests(processed, synthetic, tmp_path / "synthetic")
    params = classifier_params(synthetic_use="replace", replace_probability=0.5, synthetic_ratio=2.0)
    splits = load_splits(processed, synthetic, params)
    assert len(splits.synthetic) == 18, "replace draws from every variant, not a ratio sample"
    train = variant_train_set(splits, "real_plus_synthetic", params.classifier)
    baseline = variant_train_set(splits, "real_only", params.classifier)
    assert len(train) == len(baseline) == 36, "real x (1 + ratio): the same optimizer steps as real only"
    source_of = dict(zip(map(str, splits.synthetic.paths), source_names(splits.synthetic), strict=True))
    swapped_share = []
    for epoch in range(1, 6):
        drawn = train.for_epoch(epoch, torch.Generator().manual_seed(epoch))
        assert torch.equal(drawn.y, baseline.y)
        swapped = [i for i, p in enumerate(drawn.paths) if p != baseline.paths[i]]
        for i in swapped:  # a variant of the very image it replaces, of its class
            assert source_of[str(drawn.paths[i])] == Path(baseline.paths[i]).name
            j = splits.synthetic.paths.index(drawn.paths[i])
            assert torch.equal(drawn.x[i], splits.synthetic.x[j])
        untouched = [i for i in range(len(drawn)) if i not in swapped]
        assert torch.equal(drawn.x[untouched], baseline.x[untouched])
        swapped_share.append(len(swapped) / len(drawn))
    assert 0.3 < np.mean(swapped_share) < 0.7
    again = train.for_epoch(1, torch.Generator().manual_seed(1))
    assert again.paths == train.for_epoch(1, torch.Generator().manual_seed(1)).paths
    never = classifier_params(synthetic_use="replace", replace_probability=0.0, synthetic_ratio=2.0)
    drawn = variant_train_set(splits, "real_plus_synthetic", never.classifier).for_epoch(1, torch.Generator())
    assert drawn.paths == baseline.paths


def test_two_stage_ends_on_real_images_only_at_the_same_epoch_size(data):
    processed, synthetic = data
    params = classifier_params(synthetic_use="two_stage", finetune_fraction=0.25, epochs=8)
    splits = load_splits(processed, synthetic, params)
    train = variant_train_set(splits, "real_plus_synthetic", params.classifier)
    gen = torch.Generator()
    first, last = train.for_epoch(6, gen), train.for_epoch(7, gen)
    assert len(first) == len(last) == len(splits.train) + len(splits.synthetic)
    assert any(p in splits.synthetic.paths for p in first.paths)
    assert set(last.paths) == set(splits.train.paths), "the last 2 of 8 epochs see real images only"
    result = train_classifier(train, splits.val, splits.spec, params.classifier, seed=1)
    assert len(result.history) >= 1 and np.isfinite(result.history[0].train_loss)


def test_efficientnet_lite0_trains_from_imagenet_weights(data):
    processed, synthetic = data
    params = classifier_params(backbone="efficientnet_lite0", pretrained="imagenet", epochs=1)
    splits = load_splits(processed, synthetic, params)
    result = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    assert result.model.classifier.out_features == len(CLASSES)
    assert np.isfinite(result.history[0].train_loss)
