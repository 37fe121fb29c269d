"""A pretraining corpus: every image under a folder, the first sub-folder naming its source.

One loader serves the three networks pretrained on the surface corpus (the diffusion prior, the FID feature
network and the classifier backbone): the same files, the same grey conversion, the same random views.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import IMAGE_EXTENSIONS
from .utils import sha256_file


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
