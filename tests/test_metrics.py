"""FID/KID on real feature networks: the statistics, their sensitivity, torchmetrics parity, cache, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, write_corpus
from PIL import Image

from stablesdg.config import NEU_CLASSES, MetricsConfig, parse_params
from stablesdg.demo import demo_image
from stablesdg.errors import FeatureWeightsError
from stablesdg.inception import INCEPTION_FILE, INCEPTION_URL, InceptionPool3
from stablesdg.metrics import (
    DEGRADATIONS,
    NET_RECORD,
    SURFACE_FILE,
    SURFACE_NET_DIR,
    SURFACE_SIZE,
    FeatureCache,
    MetricsError,
    degrade,
    featurize,
    fid_bootstrap_std,
    fid_from_features,
    fid_kid,
    frechet_distance,
    kid_from_features,
    load_extractor,
    load_surface_net,
    nearest_distances,
    novelty,
    surface_extractor,
    to_input,
)
from stablesdg.pretraining.corpus import FolderCorpus
from stablesdg.pretraining.feature_net import SurfaceNetRecipe, pretrain_surface_net, save_surface_net
from stablesdg.utils import read_json


def demo_set(start: int, per_class: int, seed: int = 7, size: int = 64) -> list[Image.Image]:
    """Demo images of every class, from indices the feature net was not trained on."""
    return [demo_image(c, i, seed, size) for i in range(start, start + per_class) for c in NEU_CLASSES]


def noisy(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    return degrade(img, "noise", sigma, seed)


@pytest.fixture(scope="module")
def world():
    """The surface feature net shipped in the package (pretrained on the surface corpus, not on demo data)."""
    return {"net": load_surface_net()}


@pytest.fixture
def extractor(world):
    return surface_extractor(world["net"])


def test_shipped_surface_net_record(world):
    record = read_json(SURFACE_NET_DIR / NET_RECORD)
    assert record["feature_net"] == "surface" and len(record["sources"]) >= 2
    assert len(record["corpus_manifest_sha256"]) == 64 and record["corpus_images"] > 1000
    assert record["heldout_accuracy"] > 1 / len(record["sources"]) + 0.3, "it must tell the sources apart"
    assert world["net"].num_features == record["recipe"]["feature_dim"]


def test_fid_of_a_set_with_itself_is_zero(extractor):
    feats = featurize(extractor, demo_set(100, 16))
    scale = np.trace(np.cov(feats.astype(np.float64), rowvar=False))
    assert scale > 1.0
    assert abs(fid_from_features(feats, feats)) < 1e-6 * scale
    assert fid_from_features(feats, featurize(extractor, demo_set(200, 16))) > 1e-3 * scale


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_fid_rises_monotonically_with_degradation(extractor, kind):
    real, fake = demo_set(100, 8), demo_set(200, 8)
    fids = [fid_kid(real, [degrade(img, kind, lvl, i) for i, img in enumerate(fake)], extractor)["fid_surface"]
            for lvl in DEGRADATIONS[kind]]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


def test_fid_matches_torchmetrics_for_the_same_feature_module(world):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = world["net"]  # 64-d: 90 images per set keep both covariances full rank
    real = demo_set(300, 15)
    fake = [noisy(img, 10, i) for i, img in enumerate(demo_set(400, 15))]
    ours = fid_kid(real, fake, surface_extractor(net))["fid_surface"]
    tm = FrechetInceptionDistance(feature=net, normalize=True)
    tm.update(torch.stack([to_input(i, SURFACE_SIZE, antialias=True) for i in real]), real=True)
    tm.update(torch.stack([to_input(i, SURFACE_SIZE, antialias=True) for i in fake]), real=False)
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
    plain = surface_extractor(world["net"])
    uncached = fid_kid(real, fake, plain)
    cached_ext = surface_extractor(world["net"])
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
        load_extractor(params.metrics)
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message and str(tmp_path / "hub" / "checkpoints") in message
    params = parse_params({"metrics": {"feature_net": "inception", "inception_weights": str(tmp_path / "w.pth")}})
    with pytest.raises(FeatureWeightsError, match="w.pth"):
        load_extractor(params.metrics)


def test_inception_loads_a_weights_file_and_gives_pool3_features(tmp_path):
    """The real file cannot be downloaded here; a file with the same keys exercises the whole loading path."""
    torch.manual_seed(0)
    weights = tmp_path / INCEPTION_FILE
    torch.save(InceptionPool3().net.state_dict(), weights)
    params = parse_params({"metrics": {"feature_net": "inception", "inception_weights": str(weights)}})
    ext = load_extractor(params.metrics)
    assert ext.name == "inception" and ext.input_size == 299
    assert to_input(Image.new("L", (64, 64), 128), 299, antialias=False).shape == (3, 299, 299)
    scores = fid_kid(demo_set(0, 1)[:3], demo_set(1, 1)[:3], ext, kid_subsets=2)
    assert set(scores) == {"fid", "kid_mean", "kid_std"} and all(np.isfinite(v) for v in scores.values())
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(FeatureWeightsError, match="not the FID Inception weights"):
        load_extractor(params.metrics)


def test_surface_net_pretraining_is_deterministic_and_round_trips(tmp_path):
    corpus = FolderCorpus(write_corpus(tmp_path / "corpus"), 64)
    recipe = SurfaceNetRecipe(epochs=2, feature_dim=16, batch_size=8, input_size=64)
    images = demo_set(1000, 2)
    a, stats = pretrain_surface_net(corpus, recipe)
    b, _ = pretrain_surface_net(corpus, recipe)
    c, _ = pretrain_surface_net(corpus, SurfaceNetRecipe(epochs=2, feature_dim=16, batch_size=8, input_size=64,
                                                         seed=1))
    fa, fb, fc = (featurize(surface_extractor(n), images) for n in (a, b, c))
    assert np.array_equal(fa, fb) and not np.allclose(fa, fc)
    assert stats["sources"] == ["crazing", "patches", "scratches"] and stats["heldout_images"] == 3
    path = save_surface_net(a, tmp_path / "net", {"corpus": "corpus", "corpus_manifest_sha256": corpus.manifest_sha256()})
    assert np.array_equal(featurize(surface_extractor(load_surface_net(tmp_path / "net")), images), fa)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(FeatureWeightsError, match="sha256"):
        load_surface_net(tmp_path / "net")
    with pytest.raises(FeatureWeightsError, match=SURFACE_FILE):
        load_surface_net(tmp_path / "nowhere")


def test_corpus_skips_a_bad_file_and_hashes_content(tmp_path):
    root = write_corpus(tmp_path / "c", per_source=2)
    (root / "patches" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    corpus = FolderCorpus(root, 32)
    assert len(corpus.images) == 6 and corpus.skipped and "broken.png" in corpus.skipped[0]
    before = corpus.manifest_sha256()
    demo_image("crazing", 50, 11, 96).save(root / "crazing" / "0.png")
    assert FolderCorpus(root, 32).manifest_sha256() != before
    views, captions = corpus.views(np.random.default_rng(0), 5, 24)
    assert views.shape == (5, 24, 24) and views.dtype == np.uint8 and all("texture" in c for c in captions)


def test_noise_and_novelty_measures():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 8)), rng.normal(size=(40, 8)) + 0.5
    assert fid_bootstrap_std(real, fake, 20, 0) > 0 and np.isnan(fid_bootstrap_std(real, fake, 0, 0))
    train = rng.normal(size=(10, 8))
    copies = train[rng.integers(0, 10, 30)] + 1e-3 * rng.normal(size=(30, 8))
    assert novelty(copies, real, train) < 0.05, "copies of the train images have no novelty"
    assert 0.6 < novelty(rng.normal(size=(50, 8)), real, train) < 1.6, "new samples are as novel as real ones"
    d, idx = nearest_distances(train[:3] + 1e-6, train)
    assert idx.tolist() == [0, 1, 2] and np.all(d < 1e-5)


NEU_CLS = REPO_ROOT.parent / "shared" / "datasets" / "NEU-CLS"


@pytest.mark.skipif(not NEU_CLS.is_dir(), reason=f"real NEU-CLS images not found at {NEU_CLS} (see README)")
def test_surface_fid_on_real_neu_is_small_for_real_vs_real_and_rises_with_noise_and_blur(world):
    """Real steel the feature net never saw: two disjoint halves of NEU-CLS, clean and degraded."""
    from stablesdg.metrics import Scorer, sanity_curves

    files = sorted(NEU_CLS.glob("*.bmp"))
    first, second = files[0::30][:60:2], files[0::30][1:60:2]  # 30 + 30 images, every class
    result = sanity_curves(Scorer(surface_extractor(world["net"]), None, MetricsConfig(), 42), first, second)
    fids = {kind: [p["fid_surface"] for p in curve] for kind, curve in result["curves"].items()}
    assert result["monotone"]["noise"], fids
    # blur: rises up to radius 3 px; beyond that this 64-d net saturates (documented in README), but every
    # blurred set stays far from the real-vs-real level
    assert all(a < b for a, b in zip(fids["blur"][:4], fids["blur"][1:4], strict=False)), fids
    assert min(fids["blur"][2:]) > 5 * result["real_vs_real"], fids
    assert result["real_vs_real"] < 0.25 * max(fids["noise"]), result


def test_detail_ratio_tells_blurred_and_noisy_sets_from_real_ones(tmp_path):
    from stablesdg.metrics import detail_ratio

    real = demo_set(0, 2, size=128)
    assert detail_ratio(real, real) == pytest.approx(1.0)
    blurred = [degrade(img, "blur", 2, 0) for img in real]
    grainy = [noisy(img, 20, i) for i, img in enumerate(real)]  # sigma 20 grey levels
    assert detail_ratio(real, blurred) < 0.5 < 1.5 < detail_ratio(real, grainy)
    files = []
    for i, img in enumerate(blurred):
        files.append(tmp_path / f"{i}.png")
        img.save(files[-1])
    assert detail_ratio(real, files) == pytest.approx(detail_ratio(real, blurred))  # files or images alike
