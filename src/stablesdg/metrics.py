"""FID and KID between real and synthetic images, on Inception-v3 pool3 features or the surface feature net.

`inception` is the standard FID network (pytorch-fid's port of the TF 2015-12-05 graph, 2048-d pool3 features,
bilinear resize to 299): numbers comparable with published FIDs; it needs the weights file, which cannot be
downloaded here. `surface` is a small CNN shipped in the package, pretrained on the surface corpus (which of 11
industrial/texture sources a view comes from), never on a project's own images, so its figures mean the same
for every split and data set; they carry the suffix `_surface` everywhere, so nobody mistakes them for
Inception FID.

Features are cached per image content and network fingerprint: the search loop featurises only new images.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file
from scipy import linalg, ndimage
from torch import nn
from tqdm import tqdm

from .config import MetricsConfig
from .errors import FeatureWeightsError, StableSDGError
from .inception import INCEPTION_SIZE, load_inception
from .utils import derive_seed, pick_device, read_json, sha256_file

SURFACE_SIZE = 128
SURFACE_NET_DIR = Path(__file__).parent / "assets" / "feature_net"
SURFACE_FILE, NET_RECORD = "feature_net.safetensors", "feature_net.json"
PREPROCESS_VERSION = "rgb-float01-bilinear-v1"  # part of every fingerprint: a change invalidates the cache

ImageLike: TypeAlias = Path | str | Image.Image


class MetricsError(StableSDGError, ValueError):
    """The image sets cannot be scored (too few images, a degenerate covariance)."""


def metric_keys(net: str) -> dict[str, str]:
    """Metric names for a feature net: only Inception numbers are called plain `fid` (published-FID scale)."""
    suffix = "" if net == "inception" else f"_{net}"
    return {"fid": f"fid{suffix}", "kid_mean": f"kid{suffix}_mean", "kid_std": f"kid{suffix}_std"}


# --------------------------------------------------------------------------------------- statistics
def _check_sizes(n_real: int, n_fake: int, what: str) -> None:
    if n_real < 2 or n_fake < 2:
        raise MetricsError(f"{what} needs at least 2 images in each set; got {n_real} real and {n_fake} synthetic")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1-mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid computes it (scipy sqrtm, eps fallback)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    bad = not np.isfinite(covmean).all() or (
        np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3))
    if bad:  # singular product (fewer images than dimensions): regularise the diagonal, like pytorch-fid
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"FID: imaginary component {np.abs(covmean.imag).max():.3g} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    _check_sizes(len(real), len(fake), "FID")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    if min(len(real), len(fake)) <= real.shape[1]:
        return _fid_low_rank(real, fake)
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _fid_low_rank(real: np.ndarray, fake: np.ndarray) -> float:
    """The same FID for sets smaller than the feature dimension, without a d x d matrix square root.

    With S1 = AᵀA and S2 = BᵀB (centred, scaled features), S1·S2 has the non-zero eigenvalues of (ABᵀ)(ABᵀ)ᵀ,
    so Tr sqrt(S1·S2) is the sum of the singular values of ABᵀ (n1 x n2). Exact where sqrtm is singular, and
    seconds instead of minutes for 2048-d Inception features of a few images.
    """
    a = (real - real.mean(0)) / np.sqrt(len(real) - 1)
    b = (fake - fake.mean(0)) / np.sqrt(len(fake) - 1)
    diff = real.mean(0) - fake.mean(0)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


def _mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³ (Bińkowski et al., torch-fidelity)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid_from_features(real: np.ndarray, fake: np.ndarray, subset_size: int = 50, subsets: int = 50,
                      seed: int = 0) -> tuple[float, float]:
    """KID mean and std over random subsets; the subset size shrinks to fit small sets."""
    _check_sizes(len(real), len(fake), "KID")
    m = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    values = [_mmd2_poly(real[rng.choice(len(real), m, replace=False)], fake[rng.choice(len(fake), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------- embedding net
class EmbeddingNet(nn.Module):
    """Four conv blocks -> `dim`-d embedding (the features) -> class logits (the training objective only)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim),
                                  # standardised features (real-train statistics): the KID kernel (x·y/d + 1)³
                                  # expects O(1) values, as Inception's pool3 gives
                                  nn.BatchNorm1d(dim, affine=False))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, n_classes))
        self.num_features = dim  # torchmetrics reads this to size its statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


def state_fingerprint(module: nn.Module, name: str, size: int) -> str:
    """Content hash of the weights + what the inputs go through: the feature cache's namespace."""
    h = hashlib.sha256(f"{name}|{size}|{PREPROCESS_VERSION}".encode())
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- extraction
def load_image(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as img:
        img.load()
        return img.copy()


def image_key(img: Image.Image) -> str:
    """Content hash of the decoded pixels: a file and the same image in memory share one cache entry."""
    h = hashlib.sha256(f"{img.mode}|{img.size}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def to_input(img: Image.Image, size: int, antialias: bool) -> torch.Tensor:
    """RGB (grey repeated to 3 channels), floats in [0, 1], bilinear resize to the network's input size."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return x[0]


@dataclass
class Extractor:
    """A feature network with its input format; `featurized` counts images that went through it."""

    name: str  # "surface" | "inception"
    module: nn.Module
    input_size: int
    fingerprint: str
    antialias: bool = False
    batch_size: int = 32
    device: str = "cpu"
    featurized: int = 0

    @property
    def keys(self) -> dict[str, str]:
        return metric_keys(self.name)

    @property
    def namespace(self) -> str:
        """Cache namespace: weights + preprocessing, and the device (GPU and CPU floats differ slightly)."""
        return f"{self.fingerprint[:16]}-{self.device}"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], desc: str = "features") -> np.ndarray:
        self.module.to(self.device).eval()
        out = []
        starts = range(0, len(images), self.batch_size)
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2):
            batch = torch.stack([to_input(img, self.input_size, self.antialias)
                                 for img in images[i:i + self.batch_size]])
            out.append(self.module(batch.to(self.device)).float().cpu().numpy())
        self.featurized += len(images)
        return np.concatenate(out) if out else np.zeros((0, self.module.num_features), np.float32)


@dataclass
class FeatureCache:
    """One .npy per (network fingerprint, image content) under `metrics.cache_dir`."""

    root: Path
    hits: int = 0
    misses: int = 0

    def _path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.npy"

    def get(self, namespace: str, key: str) -> np.ndarray | None:
        path = self._path(namespace, key)
        if path.exists():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        return None

    def put(self, namespace: str, key: str, vector: np.ndarray) -> None:
        path = self._path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.time_ns()}.tmp.npy")
        np.save(tmp, vector)
        tmp.replace(path)  # atomic: a reader never sees half a file


def featurize(extractor: Extractor, items: Sequence[ImageLike], cache: FeatureCache | None = None,
              desc: str = "features") -> np.ndarray:
    """(N, D) features; with a cache only images not seen before go through the network."""
    images = [load_image(i) for i in items]
    if cache is None:
        return extractor(images, desc)
    keys = [image_key(img) for img in images]
    found = {k: cache.get(extractor.namespace, k) for k in dict.fromkeys(keys)}
    todo = [k for k, v in found.items() if v is None]
    if todo:
        by_key = dict(zip(keys, images, strict=True))
        for k, vec in zip(todo, extractor([by_key[k] for k in todo], desc), strict=True):
            cache.put(extractor.namespace, k, vec)
            found[k] = vec
    return np.stack([found[k] for k in keys]) if keys else np.zeros((0, extractor.module.num_features))


def fid_kid(real: Sequence[ImageLike], fake: Sequence[ImageLike], extractor: Extractor,
            cache: FeatureCache | None = None, kid_subset_size: int = 50, kid_subsets: int = 50,
            seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std) of `fake` against `real`, keyed by the extractor's metric names."""
    r = featurize(extractor, real, cache, "real features")
    f = featurize(extractor, fake, cache, "synthetic features")
    return scores_from_features(r, f, extractor.keys, kid_subset_size, kid_subsets, seed)


def scores_from_features(r: np.ndarray, f: np.ndarray, keys: dict[str, str], kid_subset_size: int = 50,
                         kid_subsets: int = 50, seed: int = 0) -> dict[str, float]:
    kid_mean, kid_std = kid_from_features(r, f, kid_subset_size, kid_subsets, seed)
    return {keys["fid"]: fid_from_features(r, f), keys["kid_mean"]: kid_mean, keys["kid_std"]: kid_std}


@dataclass
class Scorer:
    """Extractor + cache + the KID settings of params: what search, evaluate and ablation call."""

    extractor: Extractor
    cache: FeatureCache | None
    metrics: MetricsConfig
    seed: int

    @property
    def keys(self) -> dict[str, str]:
        return self.extractor.keys

    def features(self, items: Sequence[ImageLike], desc: str = "features") -> np.ndarray:
        return featurize(self.extractor, items, self.cache, desc)

    def score(self, real: Sequence[ImageLike], fake: Sequence[ImageLike]) -> dict[str, float]:
        m = self.metrics
        return fid_kid(real, fake, self.extractor, self.cache, m.kid_subset_size, m.kid_subsets,
                       derive_seed(self.seed, "kid") % 2**32)

    def score_features(self, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
        """`score` on features already extracted (the search reuses them for noise and novelty)."""
        m = self.metrics
        return scores_from_features(real, fake, self.keys, m.kid_subset_size, m.kid_subsets,
                                    derive_seed(self.seed, "kid") % 2**32)


# --------------------------------------------------------------------------------------- noise, novelty
def fid_bootstrap_std(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int) -> float:
    """Std of FID over resamples (with replacement) of both sets: the measurement noise of one trial."""
    if resamples < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    fids = [fid_from_features(real[rng.integers(0, len(real), len(real))], fake[rng.integers(0, len(fake), len(fake))])
            for _ in range(resamples)]
    return float(np.std(fids, ddof=1))


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of each query to its nearest reference, and that reference's index."""
    d = np.sqrt(np.maximum(((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1), 0.0))
    return d.min(1), d.argmin(1)


def novelty(fake: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> float:
    """Median nearest-train distance of the synthetic images over that of held-out real images.

    About 1: as far from the k train images as a new real image; near 0: copies of them.
    """
    reference = float(np.median(nearest_distances(heldout, train)[0]))
    return float(np.median(nearest_distances(fake, train)[0]) / max(reference, 1e-12))


DEGRADATIONS: dict[str, list[float]] = {"noise": [0, 6, 12, 24, 48], "blur": [0, 0.75, 1.5, 3, 6]}


def degrade(img: Image.Image, kind: str, level: float, seed: int) -> Image.Image:
    """Gaussian pixel noise (sigma in grey levels) or Gaussian blur (radius in px) on a grey image."""
    img = img.convert("L")
    if not level:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(level))
    pixels = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0.0, level, img.size[::-1])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def sanity_curves(scorer: Scorer, real: Sequence[ImageLike], other: Sequence[ImageLike]) -> dict:
    """FID of `other` real images against `real`, clean and increasingly degraded: a feature net that measures
    image quality gives a small clean value and rises monotonically with each degradation."""
    fid = scorer.keys["fid"]
    others = [load_image(i) for i in other]
    curves: dict[str, list[dict[str, float]]] = {kind: [{"level": lvl, fid: scorer.score(real, [degrade(im, kind, lvl, i) for i, im in enumerate(others)])[fid]}
                     for lvl in levels] for kind, levels in DEGRADATIONS.items()}
    monotone = {kind: all(a[fid] < b[fid] for a, b in zip(c, c[1:], strict=False)) for kind, c in curves.items()}
    return {"metric": fid, "n_real": len(real), "n_other": len(others), "real_vs_real": curves["noise"][0][fid],
            "curves": curves, "monotone": monotone}


# --------------------------------------------------------------------------------------- surface net


def load_surface_net(folder: Path = SURFACE_NET_DIR) -> EmbeddingNet:
    """The shipped surface net; refuses a file that no longer matches its record."""
    path = folder / SURFACE_FILE
    hint = ("reinstall the package, or rebuild it with `stablesdg pretrain feature-net --corpus "
            "../shared/datasets/surface-corpus`")
    if not path.exists() or not (folder / NET_RECORD).exists():
        raise FeatureWeightsError(f"surface feature net not found: put {SURFACE_FILE} and {NET_RECORD} in {folder}; "
                                  f"{hint}")
    if sha256_file(path) != read_json(folder / NET_RECORD)["sha256"]:
        raise FeatureWeightsError(f"{path}: sha256 differs from {folder / NET_RECORD}; {hint}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    net = EmbeddingNet(int(meta["feature_dim"]), int(meta["n_classes"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def surface_extractor(net: EmbeddingNet, batch_size: int = 32, device: str = "cpu") -> Extractor:
    return Extractor("surface", net, SURFACE_SIZE, state_fingerprint(net, "surface", SURFACE_SIZE),
                     antialias=True, batch_size=batch_size, device=device)


def load_extractor(m: MetricsConfig) -> Extractor:
    """The network `metrics.feature_net` names, ready to featurise."""
    device = pick_device("auto")
    if m.feature_net == "inception":
        model, _ = load_inception(m.inception_weights)
        return Extractor("inception", model, INCEPTION_SIZE, state_fingerprint(model, "inception", INCEPTION_SIZE),
                         antialias=False, batch_size=m.batch_size, device=device)
    return surface_extractor(load_surface_net(), m.batch_size, device)


def load_scorer(m: MetricsConfig, seed: int, use_cache: bool = True) -> Scorer:
    cache = FeatureCache(Path(m.cache_dir)) if use_cache else None
    return Scorer(load_extractor(m), cache, m, seed)


# --------------------------------------------------------------------------------------- the features record
def feature_net_record(m: MetricsConfig) -> dict:
    """Which feature network (and which weights file) every FID/KID of this run uses."""
    if m.feature_net == "surface":
        net = load_surface_net()
        shipped = read_json(SURFACE_NET_DIR / NET_RECORD)
        return {"feature_net": "surface", "weights": f"stablesdg/assets/feature_net/{SURFACE_FILE}",
                "weights_sha256": shipped["sha256"], "corpus": shipped["corpus"],
                "corpus_manifest_sha256": shipped["corpus_manifest_sha256"],
                "heldout_accuracy": shipped["heldout_accuracy"],
                "fingerprint": state_fingerprint(net, "surface", SURFACE_SIZE)}
    model, path = load_inception(m.inception_weights)
    return {"feature_net": "inception", "weights": str(path), "weights_sha256": sha256_file(path),
            "fingerprint": state_fingerprint(model, "inception", INCEPTION_SIZE)}


# --------------------------------------------------------------------------------------- fine detail
DETAIL_SIZE = 128  # real and synthetic files may differ in size: fine detail is compared at one resolution


def detail_energy(item) -> float:
    """Mean squared Laplacian response of the grey image at DETAIL_SIZE px (pixels in [0, 1]): its fine detail."""
    img = load_image(item).convert("L").resize((DETAIL_SIZE, DETAIL_SIZE), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    laplacian = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(np.mean(laplacian**2))


def mean_detail_energy(items: Sequence[ImageLike]) -> float:
    return float(np.mean([detail_energy(item) for item in items]))


def detail_ratio(real: Sequence[ImageLike], fake: Sequence[ImageLike], real_energy: float | None = None) -> float:
    """Fine detail of the synthetic images over that of real ones: 1 = as much, < 1 = blurrier, > 1 = noisier.
    A blurred copy of a train image can score a good FID and still lose the thin cracks and small pits that
    tell the defect classes apart. `real_energy`: the real images' `mean_detail_energy`, when already known."""
    return mean_detail_energy(fake) / (mean_detail_energy(real) if real_energy is None else real_energy)


# --------------------------------------------------------------------------------------- image similarity
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM with an 11x11 Gaussian window (sigma 1.5), as in Wang et al. 2004, on 8-bit grey images."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))
