"""FID/KID on real feature networks: the statistics, their sensitivity, torchmetrics parity, cache, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_processed
from PIL import Image, ImageFilter

from stablesdg.config import NEU_CLASSES, parse_params
from stablesdg.demo import demo_image
from stablesdg.metrics import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FeatureCache,
    FeatureWeightsError,
    InceptionPool3,
    MetricsError,
    features_command,
    featurize,
    fid_from_features,
    fid_kid,
    frechet_distance,
    kid_from_features,
    load_extractor,
    load_offline_net,
    offline_extractor,
    to_input,
    train_embedding_net,
    train_feature_net,
    train_files,
)


def demo_set(start: int, per_class: int, seed: int = 7, size: int = 64) -> list[Image.Image]:
    """Demo images of every class, from indices the feature net was not trained on."""
    return [demo_image(c, i, seed, size) for i in range(start, start + per_class) for c in NEU_CLASSES]


def noisy(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0.0, sigma, img.size[::-1])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A processed 6-class demo set and the offline feature net trained on its train split."""
    root = tmp_path_factory.mktemp("metrics")
    processed = make_processed(root, list(NEU_CLASSES), per_class=14, size=64, k_shot=10)
    params = parse_params({"seed": 0})
    record = train_feature_net(params, processed, root / "feature_net")
    return {"root": root, "processed": processed, "params": params, "record": record,
            "net": load_offline_net(params, root / "feature_net", processed)}


@pytest.fixture
def extractor(world):
    return offline_extractor(world["net"])


def test_feature_net_record_and_fit(world):
    record = world["record"]
    assert record["feature_net"] == "offline" and record["train_images"] == 60
    assert record["feature_dim"] == 64 and record["classes"] == list(NEU_CLASSES)
    assert record["train_accuracy"] > 1 / 6 + 0.2, "the embedding must have learned the classes"


def test_fid_of_a_set_with_itself_is_zero(extractor):
    feats = featurize(extractor, demo_set(100, 16))
    scale = np.trace(np.cov(feats.astype(np.float64), rowvar=False))
    assert scale > 1.0
    assert abs(fid_from_features(feats, feats)) < 1e-6 * scale
    assert fid_from_features(feats, featurize(extractor, demo_set(200, 16))) > 1e-3 * scale


@pytest.mark.parametrize("degrade, levels", [
    (lambda img, s, i: noisy(img, s, seed=i), [0, 6, 12, 24, 48]),
    (lambda img, r, i: img.filter(ImageFilter.GaussianBlur(r)) if r else img, [0, 0.75, 1.5, 3, 6]),
], ids=["gaussian-noise", "blur"])
def test_fid_rises_monotonically_with_degradation(extractor, degrade, levels):
    real, fake = demo_set(100, 8), demo_set(200, 8)
    fids = [fid_kid(real, [degrade(img, lvl, i) for i, img in enumerate(fake)], extractor)["fid_offline"]
            for lvl in levels]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


def test_fid_matches_torchmetrics_for_the_same_feature_module(world):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = world["net"]  # 64-d: 90 images per set keep both covariances full rank
    real = demo_set(300, 15)
    fake = [noisy(img, 10, i) for i, img in enumerate(demo_set(400, 15))]
    ours = fid_kid(real, fake, offline_extractor(net))["fid_offline"]
    tm = FrechetInceptionDistance(feature=net, normalize=True)
    tm.update(torch.stack([to_input(i, 64, antialias=True) for i in real]), real=True)
    tm.update(torch.stack([to_input(i, 64, antialias=True) for i in fake]), real=False)
    theirs = float(tm.compute())
    assert ours > 1.0
    assert abs(ours - theirs) <= 1e-3 * abs(theirs), (ours, theirs)


def test_small_sets_give_the_sqrtm_fid_without_the_big_square_root():
    """Fewer images than dimensions: the singular-value route equals pytorch-fid's sqrtm formula."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(12, 64)), 1.3 * rng.normal(size=(9, 64)) + 0.2
    reference = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert fid_from_features(real, fake) == pytest.approx(reference, rel=1e-6)


def test_kid_works_on_twenty_images_and_refuses_one(extractor):
    from torchmetrics.image.kid import poly_mmd

    real = featurize(extractor, demo_set(500, 4)[:20])
    fake = featurize(extractor, [noisy(img, 20, i) for i, img in enumerate(demo_set(600, 5))])
    mean, std = kid_from_features(real, fake[:20], subset_size=50, subsets=20)
    assert np.isfinite(mean) and np.isfinite(std) and mean > 0
    reference = poly_mmd(torch.from_numpy(real).double(), torch.from_numpy(fake[:20]).double())
    assert mean == pytest.approx(float(reference), rel=1e-9), "the unbiased MMD² torchmetrics computes"
    mean, std = kid_from_features(real, fake, subset_size=50, subsets=20)  # 20 vs 30: subsets of 20 vary
    assert np.isfinite(mean) and np.isfinite(std) and std > 0
    assert np.isfinite(kid_from_features(real[:2], fake[:3])[0])
    with pytest.raises(MetricsError, match="at least 2 images"):
        kid_from_features(real[:1], fake)
    with pytest.raises(MetricsError, match="at least 2 images"):
        fid_from_features(real, fake[:1])


def test_cached_and_uncached_runs_give_identical_numbers(world, tmp_path):
    real, fake = demo_set(700, 3), [noisy(img, 8, i) for i, img in enumerate(demo_set(800, 3))]
    plain = offline_extractor(world["net"])
    uncached = fid_kid(real, fake, plain)
    cached_ext = offline_extractor(world["net"])
    cache = FeatureCache(tmp_path / "cache")
    cold = fid_kid(real, fake, cached_ext, cache)
    assert cached_ext.featurized == len(real) + len(fake) and cache.hits == 0
    warm = fid_kid(real, fake, cached_ext, cache)
    assert cached_ext.featurized == len(real) + len(fake), "a warm cache must not run the network"
    assert cache.hits == len(real) + len(fake)
    assert uncached == cold == warm
    more = [noisy(img, 8, 99) for img in demo_set(900, 1)]
    fid_kid(real, fake + more, cached_ext, cache)  # the search loop's case: only new images are featurised
    assert cached_ext.featurized == len(real) + len(fake) + len(more)


def test_missing_inception_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    params = parse_params({"metrics": {"feature_net": "inception"}})
    with pytest.raises(FeatureWeightsError) as err:
        load_extractor(params)
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message and str(tmp_path / "hub" / "checkpoints") in message
    params = parse_params({"metrics": {"feature_net": "inception", "inception_weights": str(tmp_path / "w.pth")}})
    with pytest.raises(FeatureWeightsError, match="w.pth"):
        load_extractor(params)


def test_inception_loads_a_weights_file_and_gives_pool3_features(tmp_path):
    """The real file cannot be downloaded here; a file with the same keys exercises the whole loading path."""
    torch.manual_seed(0)
    weights = tmp_path / INCEPTION_FILE
    torch.save(InceptionPool3().net.state_dict(), weights)
    params = parse_params({"metrics": {"feature_net": "inception", "inception_weights": str(weights)}})
    ext = load_extractor(params)
    assert ext.name == "inception" and ext.input_size == 299
    assert to_input(Image.new("L", (64, 64), 128), 299, antialias=False).shape == (3, 299, 299)
    scores = fid_kid(demo_set(0, 1)[:3], demo_set(1, 1)[:3], ext, kid_subsets=2)
    assert set(scores) == {"fid", "kid_mean", "kid_std"} and all(np.isfinite(v) for v in scores.values())
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(FeatureWeightsError, match="not the FID Inception weights"):
        load_extractor(params)


def test_offline_net_training_is_deterministic(world):
    files = train_files(world["params"], world["processed"])
    params = parse_params({"seed": 5, "metrics": {"offline_epochs": 2, "offline_feature_dim": 16}})
    images = demo_set(1000, 2)
    a = featurize(offline_extractor(train_embedding_net(params, files)[0]), images)
    b = featurize(offline_extractor(train_embedding_net(params, files)[0]), images)
    other = parse_params({"seed": 6, "metrics": {"offline_epochs": 2, "offline_feature_dim": 16}})
    c = featurize(offline_extractor(train_embedding_net(other, files)[0]), images)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_features_command_and_stale_net(world, tmp_path, mlflow_store):
    out = tmp_path / "fn"
    (tmp_path / "params.yaml").write_text("seed: 0\nmetrics: {offline_epochs: 2}\n")
    result = CliRunner().invoke(features_command, ["--params", str(tmp_path / "params.yaml"), "--processed",
                                                   str(world["processed"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "feature_net.pt").exists() and "offline" in result.output
    load_offline_net(parse_params({"seed": 0, "metrics": {"offline_epochs": 2}}), out, world["processed"])
    with pytest.raises(FeatureWeightsError, match="stale.*epochs"):
        load_offline_net(parse_params({"seed": 0}), out, world["processed"])
    with pytest.raises(FeatureWeightsError, match="stablesdg features"):
        load_offline_net(world["params"], tmp_path / "nowhere")
