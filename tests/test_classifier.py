"""Classifier training on real (+ synthetic) images: backbones, metrics, determinism, the variants' train sets; the
train stage is in tests/stages/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import THREE_CLASSES, classifier_params

from stablesdg.classifier import (
    PretrainedWeightsError,
    augment_batch,
    build_backbone,
    classification_metrics,
    make_spec,
    sample_synthetic,
    train_classifier,
    weights_file_name,
)
from stablesdg.comparison import load_splits, source_names, variant_train_set
from stablesdg.config import BACKBONES


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
    spec = make_spec(THREE_CLASSES, classifier_params().classifier)
    x = torch.randn(6, 3, 48, 48)
    a = augment_batch(x, spec, torch.Generator().manual_seed(1))
    b = augment_batch(x, spec, torch.Generator().manual_seed(1))
    c = augment_batch(x, spec, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_synthetic_sample_follows_the_ratio_per_class(classifier_data):
    processed, synthetic = classifier_data
    paths, labels = sample_synthetic(synthetic, THREE_CLASSES, [4, 4, 2], ratio=1.0, seed=1)
    assert [labels.count(i) for i in range(3)] == [4, 4, 2]
    assert all(p.parent.name == THREE_CLASSES[label] for p, label in zip(paths, labels, strict=True))
    again, _ = sample_synthetic(synthetic, THREE_CLASSES, [4, 4, 2], ratio=1.0, seed=1)
    assert again == paths


def test_training_is_deterministic_and_learns(classifier_data):
    processed, synthetic = classifier_data
    params = classifier_params(epochs=4)
    splits = load_splits(processed, synthetic, params)
    first = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    second = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = [r.train_loss for r in first.history]
    assert losses[-1] < losses[0]
    assert first.best_epoch == 1 + int(np.argmax([r.val_macro_f1 for r in first.history]))


def test_epochs_baseline_trains_the_real_images_once_an_epoch(classifier_data):
    processed, synthetic = classifier_data
    equal, epochs = (classifier_params(baseline_steps=b).classifier for b in ("equal", "epochs"))
    splits = load_splits(processed, synthetic, classifier_params())
    assert len(variant_train_set(splits, "real_only", equal)) == 24
    assert len(variant_train_set(splits, "real_only", epochs)) == 12
    augmented = variant_train_set(splits, "real_plus_synthetic", epochs)
    assert augmented.paths[:12] == splits.train.paths and augmented.paths[12:] == splits.synthetic.paths
    no_synthetic = load_splits(processed, synthetic, classifier_params(synthetic_ratio=0))
    assert variant_train_set(no_synthetic, "real_only", equal).paths == no_synthetic.train.paths


def _with_manifests(processed: Path, synthetic: Path, dest: Path) -> Path:
    """The fixture's synthetic folder plus the manifest the generate stage writes: image i made from train
    image i mod k of its class."""
    from stablesdg.data import split_paths

    for cls in THREE_CLASSES:
        (dest / cls).mkdir(parents=True)
        train = split_paths(processed, cls, "train")
        records = []
        for i, src in enumerate(sorted((synthetic / cls).glob("*.png"))):
            (dest / cls / src.name).write_bytes(src.read_bytes())
            records.append({"file": src.name, "source": train[i % len(train)].name})
        (dest / cls / "manifest.json").write_text(json.dumps({"images": records}))
    return dest


def test_replace_swaps_real_images_for_their_own_variants_at_equal_steps(classifier_data, tmp_path):
    processed, synthetic = classifier_data
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


def test_two_stage_ends_on_real_images_only_at_the_same_epoch_size(classifier_data):
    processed, synthetic = classifier_data
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


def test_efficientnet_lite0_trains_from_imagenet_weights(classifier_data):
    processed, synthetic = classifier_data
    params = classifier_params(backbone="efficientnet_lite0", pretrained="imagenet", epochs=1)
    splits = load_splits(processed, synthetic, params)
    result = train_classifier(splits.train, splits.val, splits.spec, params.classifier, seed=1)
    assert result.model.classifier.out_features == len(THREE_CLASSES)
    assert np.isfinite(result.history[0].train_loss)
