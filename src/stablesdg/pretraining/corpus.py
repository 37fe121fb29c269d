"""The pretraining corpora: every image under a folder, the first sub-folder naming its source
(`FolderCorpus`), or the built-in endless procedural textures (`ProceduralCorpus`, the offline fallback).

One folder loader serves the three networks pretrained on the surface corpus (the diffusion prior, the FID feature
network and the classifier backbone): the same files, the same grey conversion, the same random views.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from ..decoding import IMAGE_EXTENSIONS
from ..utils import derive_seed, sha256_file


class CorpusError(ValueError):
    """The corpus folder holds no usable image."""


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def manifest_sha256(root: Path, paths: list[Path]) -> str:
    """Relative path + content hash of every file: the corpus identity recorded with each model."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


class FolderCorpus:
    """Every image under `root` (recursively), grey uint8, in memory; `labels` index `sources`.

    A view is a random square region (a `min_scale`..1 fraction of the short side) resized to `resolution`,
    randomly flipped / turned by 90 degrees, then cropped to `crop` px: the texture scale of a `resolution` px
    image, whatever the crop. One unreadable file is skipped and listed, never fatal.
    """

    def __init__(self, root: Path, resolution: int, caption_template: str = "a photo of {} texture",
                 min_scale: float = 0.5) -> None:
        self.root, self.resolution, self.min_scale = Path(root), resolution, min_scale
        self.name = self.root.name
        self.paths = image_files(self.root)
        if not self.paths:
            raise CorpusError(f"{root}: no images found (searched recursively for {sorted(IMAGE_EXTENSIONS)})")
        self.sources = sorted({self._source(p) for p in self.paths})
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.captions: list[str] = []
        self.skipped: list[str] = []
        for path in tqdm(self.paths, desc=f"load {self.name}", leave=False):
            try:
                with Image.open(path) as img:
                    self.images.append(np.asarray(img.convert("L"), dtype=np.uint8))
            except (OSError, ValueError) as err:
                self.skipped.append(f"{path.relative_to(self.root)}: {err}")
                continue
            source = self._source(path)
            self.labels.append(self.sources.index(source))
            self.captions.append(caption_template.format(source.replace("_", " ").replace("-", " ")))
        if not self.images:
            raise CorpusError(f"{root}: none of the {len(self.paths)} images could be read: {self.skipped[:3]}")

    def _source(self, path: Path) -> str:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else "surface"

    def manifest_sha256(self) -> str:
        return manifest_sha256(self.root, self.paths)

    def view(self, rng: np.random.Generator, index: int, crop: int) -> np.ndarray:
        img = self.images[index]
        side = max(8, int(rng.uniform(self.min_scale, 1.0) * min(img.shape)))
        y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        region = Image.fromarray(img[y:y + side, x:x + side]).resize(
            (self.resolution, self.resolution), Image.BICUBIC)
        arr = np.rot90(np.asarray(region), int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        cy, cx = rng.integers(0, self.resolution - crop + 1, 2)
        return np.ascontiguousarray(arr[cy:cy + crop, cx:cx + crop])

    def views(self, rng: np.random.Generator, count: int, crop: int,
              indices: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """`count` random views (of `indices`, when given) and their captions."""
        picks = rng.integers(0, len(self.images), count) if indices is None else indices
        return np.stack([self.view(rng, int(i), crop) for i in picks]), [self.captions[int(i)] for i in picks]

    def holdout(self, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) image indices, stratified by source, seeded."""
        rng = np.random.default_rng(seed)
        train, held = [], []
        labels = np.asarray(self.labels)
        for label in range(len(self.sources)):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cut = int(round(len(idx) * fraction))
            held += idx[:cut].tolist()
            train += idx[cut:].tolist()
        return np.asarray(sorted(train)), np.asarray(sorted(held))


# --------------------------------------------------------------------------------------- procedural textures
CORPUS_VERSION = "textures-v1"


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma)
    return field / (field.std() + 1e-9)


def _mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float64) / 255.0


def _noise(rng, size):
    return _smooth_noise(rng, size, rng.uniform(0.5, 6))


def _grain(rng, size):
    return ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(0.3, 1.0)) * 1.5


def _stripes(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    a, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.6)
    phase = _smooth_noise(rng, size, 8) * rng.uniform(0, 2)
    return np.sin((xx * np.cos(a) + yy * np.sin(a)) * freq + phase)


def _lines(rng, size):
    def draw(d):
        base = rng.uniform(0, np.pi)
        for _ in range(rng.integers(1, 12)):
            a = base + rng.normal(0, rng.uniform(0.02, 1.0))
            cx, cy = rng.uniform(0, size, 2)
            half = rng.uniform(0.1, 0.9) * size
            d.line([(cx - np.cos(a) * half, cy - np.sin(a) * half), (cx + np.cos(a) * half, cy + np.sin(a) * half)],
                   fill=255, width=int(rng.integers(1, 4)))
    return _mask(size, draw) * rng.choice([-2.5, 2.5])


def _blobs(rng, size):
    field = _smooth_noise(rng, size, rng.uniform(3, 14))
    return ndimage.gaussian_filter((field > rng.uniform(-0.5, 1.2)).astype(float), rng.uniform(0.5, 3)) * 2 - 1


def _dots(rng, size):
    def draw(d):
        centre, spread = rng.uniform(0, size, 2), rng.uniform(0.1, 0.8) * size
        for _ in range(rng.integers(5, 200)):
            x, y = rng.normal(centre, spread)
            r = rng.uniform(0.5, 4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return _mask(size, draw) * rng.choice([-2.5, 2.5])


def _flakes(rng, size):
    def draw(d):
        for _ in range(rng.integers(3, 40)):
            x, y = rng.uniform(0, size, 2)
            w, h, rot = rng.uniform(2, 20), rng.uniform(1, 10), rng.uniform(0, np.pi)
            pts = []
            for a in np.linspace(0, 2 * np.pi, 8)[:-1]:
                px, py = w * np.cos(a) * rng.uniform(0.5, 1.2), h * np.sin(a) * rng.uniform(0.5, 1.2)
                pts.append((x + px * np.cos(rot) - py * np.sin(rot), y + px * np.sin(rot) + py * np.cos(rot)))
            d.polygon(pts, fill=255)
    m = _mask(size, draw)
    edge = m - ndimage.grey_erosion(m, size=3)
    return -m * rng.uniform(0.5, 2) + edge * rng.uniform(0, 3)


def _cracks(rng, size):
    pts = rng.uniform(0, size, (int(rng.integers(5, 80)), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.sort(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
    return -np.exp(-((d[..., 1] - d[..., 0]) ** 2) / rng.uniform(0.5, 4)) * 2.5


def _streaks(rng, size):
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), (rng.uniform(0.3, 2), rng.uniform(4, 30)))
    field /= field.std() + 1e-9
    return np.rot90(field, int(rng.integers(0, 4)))


def _rings(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0, size, 2)
    return np.sin(np.hypot(xx - cx, yy - cy) * rng.uniform(0.1, 0.8))


def _grid(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.uniform(4, 24)
    return ((np.mod(xx, period) < 1.5) | (np.mod(yy, period) < 1.5)).astype(float) * rng.choice([-2, 2])


def _shading(rng, size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(0, 2 * np.pi)
    return (xx * np.cos(a) + yy * np.sin(a)) * 3 - 1.5


FAMILIES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": _noise, "grain": _grain, "stripes": _stripes, "lines": _lines, "blobs": _blobs, "dots": _dots,
    "flakes": _flakes, "cracks": _cracks, "streaks": _streaks, "rings": _rings, "grid": _grid,
    "shading": _shading,
}


def corpus_sample(index: int, seed: int, size: int) -> tuple[Image.Image, str]:
    """One corpus image and its caption: one or two texture families over a textured base, random look."""
    rng = np.random.default_rng(derive_seed("prior-corpus", CORPUS_VERSION, seed, index))
    names = list(FAMILIES)
    picked = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)]
    canvas = _grain(rng, size) * rng.uniform(0.05, 0.4) + _shading(rng, size) * rng.uniform(0, 0.3)
    for name in picked:
        canvas = canvas + FAMILIES[name](rng, size) * rng.uniform(0.3, 1.0)
    level, contrast = rng.uniform(60, 190), rng.uniform(10, 45)
    pixels = np.clip(level + canvas * contrast, 0, 255).astype(np.uint8)
    caption = f"a photo of {' and '.join(picked)} texture"
    return Image.fromarray(pixels, mode="L"), caption


class ProceduralCorpus:
    """The built-in endless texture corpus: the offline fallback when no image folder is given."""

    name = "procedural"

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size, self.drawn = seed, size, 0

    def manifest_sha256(self) -> str:
        return hashlib.sha256(f"{CORPUS_VERSION}:{self.seed}".encode()).hexdigest()

    def views(self, rng: np.random.Generator, count: int, crop: int) -> tuple[np.ndarray, list[str]]:
        """`count` new images (never repeated), `crop` px random crops of `size` px textures."""
        images, captions = [], []
        for _ in range(count):
            img, cap = corpus_sample(self.drawn, self.seed, self.size)
            self.drawn += 1
            x, y = rng.integers(0, self.size - crop + 1, 2)
            images.append(np.asarray(img, dtype=np.uint8)[y:y + crop, x:x + crop])
            captions.append(cap)
        return np.stack(images), captions
