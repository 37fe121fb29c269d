"""The surface-pretrained classifier backbone (the library side of `stablesdg pretrain backbone`); the recognition
command is in tests/commands/test_recognition.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stablesdg.classifier import PretrainedWeightsError, build_backbone, head_prefix


def test_pretraining_records_sources_and_saves_the_body_only(surface_backbone):
    model, stats, path = surface_backbone
    from safetensors.torch import load_file

    assert stats["sources"] == ["aitex", "brodatz", "kolektorsdd"] and stats["heldout_images"] == 3
    assert 0.0 <= stats["heldout_accuracy"] <= 1.0 and stats["steps"] == 2
    saved = load_file(str(path))
    head = head_prefix(model)
    assert head == "classifier.3." and not any(k.startswith(head) for k in saved)
    assert all(v.dtype == torch.float16 for v in saved.values() if v.is_floating_point())


def test_classifier_starts_from_the_pretrained_body_with_a_fresh_head(surface_backbone):
    model, _, path = surface_backbone
    clf = build_backbone("mobilenet_v3_small", 5, pretrained=True, weights_path=str(path))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.3.")}
    for key, value in body.items():
        torch.testing.assert_close(clf.state_dict()[key].float(), value.half().float(), rtol=0, atol=0)
    assert clf.classifier[3].out_features == 5
    with pytest.raises(PretrainedWeightsError, match="does not fit classifier.backbone"):
        build_backbone("resnet18", 5, pretrained=True, weights_path=str(path))
    with pytest.raises(PretrainedWeightsError, match="stablesdg pretrain backbone"):
        build_backbone("resnet18", 5, pretrained=True, weights_path=str(path.with_name("missing.safetensors")))


def test_equal_steps_arm_repeats_the_real_images_to_the_synthetic_arm_size():
    from stablesdg.classifier import ImageSet
    from stablesdg.comparison import repeated

    real = ImageSet(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor([0, 1, 2]), [Path(f"{i}.png") for i in range(3)])
    rep = repeated(real, 8)
    assert rep.y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and rep.x.flatten().tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [p.name for p in rep.paths][-2:] == ["0.png", "1.png"]


