"""The ImageNet EfficientNet-Lite0 weights the registry ships: loaded whole and checked, and really trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stablesdg.classifier import build_backbone
from stablesdg.imagenet import LITE_WEIGHTS, ImageNetWeightsError, build_lite, load_lite_state, weights_file
from stablesdg.preprocess import PreprocessSpec, preprocess_image

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "datasets" / "surface-corpus"


def test_every_tensor_is_mapped_and_loaded_exactly():
    model = build_lite("efficientnet_lite0", pretrained=True)
    state = torch.load(weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    assert len(state) == len(loaded) == 296
    assert torch.equal(loaded["blocks.5.3.conv_pwl.weight"], state["_blocks.14._project_conv.weight"])
    assert torch.equal(loaded["conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(loaded["bn2.running_var"], state["_bn1.running_var"])


def test_classifier_gets_imagenet_body_and_a_fresh_head():
    model = build_backbone("efficientnet_lite0", 6, pretrained="imagenet")
    reference = build_lite("efficientnet_lite0", pretrained=True).state_dict()
    assert model.classifier.out_features == 6
    assert torch.equal(model.state_dict()["conv_head.weight"], reference["conv_head.weight"])
    scratch = build_backbone("efficientnet_lite0", 6, pretrained=False)
    assert not torch.equal(scratch.state_dict()["conv_head.weight"], reference["conv_head.weight"])


def test_a_file_that_is_not_the_published_one_is_refused(tmp_path):
    copy = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(weights_file("efficientnet_lite0"), copy)
    with open(copy, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 8)
    with pytest.raises(ImageNetWeightsError, match="sha256"):
        build_lite("efficientnet_lite0", pretrained=True, weights_path=str(copy))
    with pytest.raises(ImageNetWeightsError, match="not found"):
        build_lite("efficientnet_lite0", pretrained=True, weights_path=str(tmp_path / "missing.pth"))


def test_a_different_architecture_is_refused_before_loading():
    import timm

    with pytest.raises(ImageNetWeightsError, match="does not fit"):
        load_lite_state("efficientnet_lite0", timm.create_model("efficientnet_lite1", pretrained=False))
    assert LITE_WEIGHTS["efficientnet_lite0"].sha256.startswith("57934424")


def _features(model, images: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model.eval().forward_features(torch.from_numpy(np.stack(images))).mean((2, 3)).numpy()


def _probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    """A linear probe (softmax regression on standardised features, full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = torch.tensor((train_x - mean) / std), torch.tensor((test_x - mean) / std)
    torch.manual_seed(0)
    head = torch.nn.Linear(xs.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)
    ys = torch.tensor(train_y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xs), ys) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((head(xt).argmax(1).numpy() == np.asarray(test_y)).mean())


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the surface corpus is not at {CORPUS} (see README)")
def test_imagenet_features_beat_random_ones_by_a_wide_margin_on_the_surface_corpus():
    from PIL import Image

    spec = PreprocessSpec(class_names=[], input_size=(128, 128), channel_mode="RGB")
    sources = sorted(p for p in CORPUS.iterdir() if p.is_dir())
    images, labels = [], []
    for label, folder in enumerate(sources):
        for path in sorted(folder.glob("*.jpg"))[:40]:
            with Image.open(path) as img:
                images.append(preprocess_image(img, spec).astype(np.float32))
            labels.append(label)
    train = [i for i in range(len(images)) if i % 2 == 0]
    test = [i for i in range(len(images)) if i % 2 == 1]
    accuracy = {}
    for name, pretrained in (("imagenet", True), ("random", False)):
        torch.manual_seed(0)
        feats = _features(build_lite("efficientnet_lite0", pretrained), images)
        accuracy[name] = _probe_accuracy(feats[train], [labels[i] for i in train], feats[test],
                                         [labels[i] for i in test], len(sources))
    print(accuracy)
    assert accuracy["imagenet"] >= 0.85
    assert accuracy["imagenet"] - accuracy["random"] >= 0.2
