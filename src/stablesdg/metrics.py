"""FID and KID between real and synthetic images, on Inception-v3 pool3 features or an offline embedding net.

`inception` is the standard FID network (pytorch-fid's port of the TF 2015-12-05 graph, 2048-d pool3 features,
bilinear resize to 299): numbers comparable with published FIDs; it needs the weights file, which cannot be
downloaded here. `offline` is a small CNN trained on the real train split (all classes, classification
objective); its numbers carry the suffix `_offline` everywhere, so nobody mistakes them for Inception FID.

Features are cached per image content and network fingerprint: the search loop featurises only new images.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn
from tqdm import tqdm

from .config import Params
from .utils import derive_seed, pick_device, read_json, sha256_file, write_json

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ALT_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the same weights
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_SIZE = 299
OFFLINE_SIZE = 64
FEATURE_DIR = Path("models/feature_net")
NET_FILE, NET_RECORD = "feature_net.pt", "feature_net.json"
PREPROCESS_VERSION = "rgb-float01-bilinear-v1"  # part of every fingerprint: a change invalidates the cache

ImageLike = Path | str | Image.Image


class MetricsError(ValueError):
    """The image sets cannot be scored (too few images, a degenerate covariance)."""


class FeatureWeightsError(RuntimeError):
    """The feature network's weights are missing or do not fit the current data/params."""


def metric_keys(net: str) -> dict[str, str]:
    """Metric names for a feature net: offline numbers are never called plain `fid`."""
    suffix = "_offline" if net == "offline" else ""
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


# --------------------------------------------------------------------------------------- Inception (FID)
def _pool_avg(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the padding; torchvision's counts it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _pool_max(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _fid_blocks():
    """torchvision's Inception blocks with the pooling of the TF FID graph (as pytorch-fid patches them)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_pool_avg(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_pool_avg(x))]

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels: int, pool):
            super().__init__(in_channels)
            self.pool = pool  # Mixed_7b averages, Mixed_7c max-pools (a quirk of the TF graph)

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class InceptionPool3(nn.Module):
    """FID Inception-v3 up to pool3: (N, 3, 299, 299) floats in [0, 1] -> (N, 2048)."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import Inception3

        a, c, e = _fid_blocks()
        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = a(192, 32), a(256, 64), a(288, 64)
        net.Mixed_6b, net.Mixed_6c = c(768, 128), c(768, 160)
        net.Mixed_6d, net.Mixed_6e = c(768, 160), c(768, 192)
        net.Mixed_7b, net.Mixed_7c = e(1280, _pool_avg), e(2048, _pool_max)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = 2 * x - 1  # the network's own input scaling ([-1, 1])
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(configured: str | None) -> Path:
    """The weights file: `metrics.inception_weights`, else torch hub's checkpoints folder (either name)."""
    candidates = [Path(configured)] if configured else [_hub_checkpoints() / INCEPTION_FILE,
                                                        _hub_checkpoints() / INCEPTION_ALT_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FeatureWeightsError(
        f"FID Inception weights {INCEPTION_FILE} not found (looked at: {', '.join(map(str, candidates))}). "
        f"This machine cannot download it: on one with network fetch {INCEPTION_URL} (torch-fidelity's copy, "
        f"named {INCEPTION_ALT_FILE}) or {PYTORCH_FID_URL}, then put it in {_hub_checkpoints()}/ or set "
        "`metrics.inception_weights: PATH` in params.yaml. Or set `metrics.feature_net: offline`."
    )


def load_inception(configured: str | None) -> tuple[InceptionPool3, Path]:
    path = find_inception_weights(configured)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = InceptionPool3()
    result = model.net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("AuxLogits.")]
    if missing or unexpected:
        raise FeatureWeightsError(f"{path}: not the FID Inception weights (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); expected {INCEPTION_FILE}")
    return model.eval().requires_grad_(False), path


# --------------------------------------------------------------------------------------- offline net
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

    name: str  # "offline" | "inception"
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
    kid_mean, kid_std = kid_from_features(r, f, kid_subset_size, kid_subsets, seed)
    keys = extractor.keys
    return {keys["fid"]: fid_from_features(r, f), keys["kid_mean"]: kid_mean, keys["kid_std"]: kid_std}


@dataclass
class Scorer:
    """Extractor + cache + the KID settings of params: what search, evaluate and ablation call."""

    extractor: Extractor
    cache: FeatureCache | None
    params: Params

    @property
    def keys(self) -> dict[str, str]:
        return self.extractor.keys

    def score(self, real: Sequence[ImageLike], fake: Sequence[ImageLike]) -> dict[str, float]:
        m = self.params.metrics
        return fid_kid(real, fake, self.extractor, self.cache, m.kid_subset_size, m.kid_subsets,
                       derive_seed(self.params.seed, "kid") % 2**32)


# --------------------------------------------------------------------------------------- offline training
def _train_tensors(files: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, cls in enumerate(files):
        for path in files[cls]:
            xs.append(to_input(load_image(path), OFFLINE_SIZE, antialias=True))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and 90° turns: steel textures have no preferred orientation."""
    out = x.clone()
    for i in range(len(out)):
        flips = torch.randint(2, (2,), generator=gen).tolist()
        turns = int(torch.randint(4, (1,), generator=gen))
        if flips[0]:
            out[i] = out[i].flip(-1)
        if flips[1]:
            out[i] = out[i].flip(-2)
        out[i] = torch.rot90(out[i], turns, dims=(-2, -1))
    return out


def train_data_hash(files: dict[str, list[Path]]) -> str:
    h = hashlib.sha256()
    for cls, paths in files.items():
        for p in paths:
            h.update(f"{cls}/{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def train_files(params: Params, processed: Path) -> dict[str, list[Path]]:
    from .data import class_names_in, split_paths

    present = set(class_names_in(processed))
    classes = [c for c in params.class_names if c in present]
    if len(classes) < 2:
        raise FeatureWeightsError(f"{processed}: the offline feature net needs at least 2 classes; found {classes}")
    return {c: split_paths(processed, c, "train") for c in classes}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the same floating-point order on every machine, and no spinning thread pools
    (a net this small trains 10x faster single-threaded on a busy 2-core CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_embedding_net(params: Params, files: dict[str, list[Path]], batch_size: int = 16) -> tuple[EmbeddingNet, dict]:
    """Seeded classification training on the real train images (CPU, seconds)."""
    with _one_thread():
        return _train_embedding_net(params, files, batch_size)


def _train_embedding_net(params: Params, files: dict[str, list[Path]], batch_size: int) -> tuple[EmbeddingNet, dict]:
    x, y = _train_tensors(files)
    gen = torch.Generator().manual_seed(derive_seed(params.seed, "feature-net"))
    with torch.random.fork_rng(devices=[]):  # the init must not depend on (or disturb) the global RNG
        torch.manual_seed(derive_seed(params.seed, "feature-net-init"))
        net = EmbeddingNet(params.metrics.offline_feature_dim, len(files))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in tqdm(range(params.metrics.offline_epochs), desc="feature net", unit="epoch", leave=False):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net.logits(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net.logits(x).argmax(1) == y).float().mean())
    return net, {"train_accuracy": accuracy, "final_loss": loss.item()}


def _offline_record(params: Params, files: dict[str, list[Path]]) -> dict:
    m = params.metrics
    return {"feature_net": "offline", "classes": list(files), "train_images": sum(map(len, files.values())),
            "train_sha256": train_data_hash(files), "feature_dim": m.offline_feature_dim,
            "epochs": m.offline_epochs, "seed": params.seed, "input_size": OFFLINE_SIZE,
            "preprocess": PREPROCESS_VERSION}


def train_feature_net(params: Params, processed: Path, out_dir: Path = FEATURE_DIR) -> dict:
    """Train the offline net on the real TRAIN split of every class; writes feature_net.pt + .json."""
    files = train_files(params, processed)
    start = time.perf_counter()
    net, stats = train_embedding_net(params, files)
    stats["val_accuracy"] = _accuracy(net, params, processed, list(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (NET_FILE + ".tmp")
    torch.save({"state_dict": net.state_dict(), "feature_dim": net.num_features, "n_classes": len(files)}, tmp)
    tmp.replace(out_dir / NET_FILE)
    record = {**_offline_record(params, files), **stats, "fingerprint": state_fingerprint(net, "offline", OFFLINE_SIZE)}
    write_json(out_dir / NET_RECORD, record)  # no timings in it: equal runs write equal bytes
    return {**record, "seconds": round(time.perf_counter() - start, 2)}


def _accuracy(net: EmbeddingNet, params: Params, processed: Path, classes: list[str]) -> float | None:
    """Held-out (val) accuracy: a sanity check that the embedding separates the classes at all."""
    from .data import split_paths

    val = {c: split_paths(processed, c, "val") for c in classes}
    if not all(val.values()):
        return None
    x, y = _train_tensors(val)
    with torch.no_grad():
        return float((net.logits(x).argmax(1) == y).float().mean())


def _stale_reason(record: dict, expected: dict) -> str | None:
    for key in ("feature_dim", "epochs", "seed", "preprocess", "classes", "train_sha256"):
        if record.get(key) != expected.get(key):
            return f"{key} is {record.get(key)!r}, params/data say {expected.get(key)!r}"
    return None


def load_offline_net(params: Params, feature_dir: Path, processed: Path | None = None) -> EmbeddingNet:
    """The trained offline net; refuses one trained on other data or other params (checked when `processed`)."""
    hint = f"run `stablesdg features` (or `dvc repro features`) to train it into {feature_dir}"
    if not (feature_dir / NET_FILE).exists() or not (feature_dir / NET_RECORD).exists():
        raise FeatureWeightsError(f"offline feature net not found in {feature_dir}: {hint}")
    record = read_json(feature_dir / NET_RECORD)
    if processed is not None:
        reason = _stale_reason(record, _offline_record(params, train_files(params, processed)))
        if reason:
            raise FeatureWeightsError(f"{feature_dir / NET_RECORD} is stale ({reason}): {hint}")
    ckpt = torch.load(feature_dir / NET_FILE, map_location="cpu", weights_only=True)
    net = EmbeddingNet(int(ckpt["feature_dim"]), int(ckpt["n_classes"]))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False)


def offline_extractor(net: EmbeddingNet, batch_size: int = 32, device: str = "cpu") -> Extractor:
    return Extractor("offline", net, OFFLINE_SIZE, state_fingerprint(net, "offline", OFFLINE_SIZE),
                     antialias=True, batch_size=batch_size, device=device)


def load_extractor(params: Params, feature_dir: Path = FEATURE_DIR, processed: Path | None = None) -> Extractor:
    """The network `metrics.feature_net` names, ready to featurise."""
    m = params.metrics
    device = pick_device("auto")
    if m.feature_net == "inception":
        model, _ = load_inception(m.inception_weights)
        return Extractor("inception", model, INCEPTION_SIZE, state_fingerprint(model, "inception", INCEPTION_SIZE),
                         antialias=False, batch_size=m.batch_size, device=device)
    return offline_extractor(load_offline_net(params, feature_dir, processed), m.batch_size, device)


def load_scorer(params: Params, feature_dir: Path = FEATURE_DIR, processed: Path | None = None,
                use_cache: bool = True) -> Scorer:
    cache = FeatureCache(Path(params.metrics.cache_dir)) if use_cache else None
    return Scorer(load_extractor(params, feature_dir, processed), cache, params)


# --------------------------------------------------------------------------------------- command
def prepare_feature_net(params: Params, processed: Path, out_dir: Path) -> dict:
    """Offline: train the net. Inception: check the weights are here and record which file is used."""
    if params.metrics.feature_net == "offline":
        return train_feature_net(params, processed, out_dir)
    model, path = load_inception(params.metrics.inception_weights)
    record = {"feature_net": "inception", "weights": str(path), "weights_sha256": sha256_file(path),
              "fingerprint": state_fingerprint(model, "inception", INCEPTION_SIZE)}
    write_json(out_dir / NET_RECORD, record)
    return record


@click.command("features")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default=str(FEATURE_DIR), show_default=True, type=click.Path(path_type=Path))
def features_command(params_path: str, processed: Path, out: Path) -> None:
    """Feature network for FID/KID: train the offline net on the real train split (or check Inception weights)."""
    from . import tracking
    from .cli import load_or_exit

    params = load_or_exit(params_path)
    try:
        with tracking.stage_run("features", params, inputs=[processed / "splits"]):
            import mlflow

            record = prepare_feature_net(params, processed, out)
            mlflow.log_metrics({k: record[k] for k in ("train_accuracy", "val_accuracy", "seconds")
                                if record.get(k) is not None})
            mlflow.log_artifact(str(out / NET_RECORD))
    except FeatureWeightsError as err:
        raise click.ClickException(str(err)) from None
    if record["feature_net"] == "offline":
        val = "n/a" if record["val_accuracy"] is None else f"{record['val_accuracy']:.3f}"
        detail = f"accuracy train {record['train_accuracy']:.3f}, val {val}; {record['seconds']} s"
    else:
        detail = record["weights"]
    click.echo(f"features: {record['feature_net']} ({detail}) -> {out / NET_RECORD}")
