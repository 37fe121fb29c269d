"""The surface-pretrained classifier backbone (`stablesdg pretrain backbone`) and the recognition table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_processed

from stablesdg.classifier import PretrainedWeightsError, build_backbone, head_prefix
from stablesdg.commands.recognition import ARMS, recognition_command
from stablesdg.demo import demo_image, write_demo_dataset
from stablesdg.pretraining.backbone import BackbonePretrainConfig, pretrain_backbone, save_body_weights
from stablesdg.pretraining.corpus import FolderCorpus

CLASSES = ["crazing", "patches", "scratches"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone")
    for source in ("brodatz", "kolektorsdd", "aitex"):
        (root / "corpus" / source).mkdir(parents=True)
        for i in range(6):
            demo_image(CLASSES[len(source) % 3], i, 3, 64).save(root / "corpus" / source / f"{i}.png")
    corpus = FolderCorpus(root / "corpus", 32)
    cfg = BackbonePretrainConfig(backbone="mobilenet_v3_small", input_size=32, epochs=1, batch_size=8)
    model, stats = pretrain_backbone(corpus, cfg)
    path = save_body_weights(model, root / "mnv3_surface.safetensors", {"backbone": cfg.backbone})
    return model, stats, path


def test_pretraining_records_sources_and_saves_the_body_only(pretrained):
    model, stats, path = pretrained
    from safetensors.torch import load_file

    assert stats["sources"] == ["aitex", "brodatz", "kolektorsdd"] and stats["heldout_images"] == 3
    assert 0.0 <= stats["heldout_accuracy"] <= 1.0 and stats["steps"] == 2
    saved = load_file(str(path))
    head = head_prefix(model)
    assert head == "classifier.3." and not any(k.startswith(head) for k in saved)
    assert all(v.dtype == torch.float16 for v in saved.values() if v.is_floating_point())


def test_classifier_starts_from_the_pretrained_body_with_a_fresh_head(pretrained):
    model, _, path = pretrained
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


def test_recognition_pairs_gains_by_seed(pretrained, tmp_path, mlflow_store):
    _, _, weights = pretrained
    processed = make_processed(tmp_path, CLASSES, per_class=10, size=48, k_shot=4)
    write_demo_dataset(tmp_path / "syn_raw", CLASSES, 4, 48, seed=77)
    for cls in CLASSES:
        (tmp_path / "synthetic" / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((tmp_path / "syn_raw" / cls).iterdir())):
            (tmp_path / "synthetic" / cls / f"{i}.png").write_bytes(src.read_bytes())
    raw = {"seed": 1, "classes": {c: {"initializer": "line"} for c in CLASSES},
           "classifier": {"backbone": "mobilenet_v3_small", "input_size": 32, "epochs": 1, "batch_size": 8,
                          "patience": 1, "repeats": 1, "synthetic_use": "append"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(recognition_command, [
        "--params", str(tmp_path / "params.yaml"), "--processed", str(processed), "--synthetic",
        str(tmp_path / "synthetic"), "--seeds", "2", "--weights", str(weights), "--out", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "rec" / "recognition.json").read_text())
    assert rec["seeds"] == [1, 2] and set(rec["inits"]) == {"scratch", "surface_pretrained"}
    assert rec["n_train_real"] == 12 and rec["n_train_synthetic"] == 12 and rec["n_test"] == 12
    for per_init in rec["inits"].values():
        assert all(len(per_init[arm]["macro_f1"]["values"]) == 2 for arm, *_ in ARMS)
        paired = np.subtract(per_init["real_synthetic"]["macro_f1"]["values"], per_init["real"]["macro_f1"]["values"])
        np.testing.assert_allclose(per_init["gain_macro_f1"]["values"], paired, atol=2e-6)
        assert per_init["gain_macro_f1"]["mean"] == pytest.approx(paired.mean(), abs=2e-6)
        equal = np.subtract(per_init["real_synthetic"]["macro_f1"]["values"],
                            per_init["real_equal_steps"]["macro_f1"]["values"])
        np.testing.assert_allclose(per_init["gain_equal_steps_macro_f1"]["values"], equal, atol=2e-6)
    table = (tmp_path / "rec" / "recognition.md").read_text()
    assert "| scratch |" in table and "| surface_pretrained |" in table and all(label in table for _, label, *_ in ARMS)
