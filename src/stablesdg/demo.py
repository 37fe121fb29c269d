"""Procedural steel-surface textures for the six NEU classes: the embedded default dataset.

Each image is a deterministic function of (seed, class, index). The textures follow what inspectors look for:
crazing is a fine crack network, inclusions are dark elongated specks along the rolling direction, patches are
large soft blotches, pitted surfaces are clusters of small dark pits, rolled-in scale is flaky bright-edged
scale along the rolling direction, and scratches are long thin straight marks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from .config import NEU_CLASSES
from .utils import derive_seed

Texture = Callable[[np.random.Generator, int], np.ndarray]


def _steel_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey rolled steel: a base level, horizontal rolling streaks and fine grain."""
    base = rng.uniform(110, 150)
    streaks = ndimage.gaussian_filter1d(rng.normal(0, 6, (size, 1)), 1.5, axis=0) * np.ones((1, size))
    grain = ndimage.gaussian_filter(rng.normal(0, 5, (size, size)), 0.7)
    shading = np.linspace(-1, 1, size)[None, :] * rng.uniform(-8, 8)
    return base + streaks + grain + shading


def _draw_mask(size: int, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(mask))
    return np.asarray(mask, dtype=np.float64) / 255.0


def _crazing(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)
    # Crack network: edges of a random Voronoi-like partition, made of short jittered segments.
    n_seeds = rng.integers(25, 60)
    pts = rng.uniform(0, size, (n_seeds, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.sqrt((xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2)
    d.sort(axis=-1)
    edges = np.exp(-((d[..., 1] - d[..., 0]) ** 2) / rng.uniform(1.0, 3.0))
    edges *= ndimage.gaussian_filter(rng.uniform(0, 1, (size, size)), 3) > rng.uniform(0.35, 0.5)
    return img - edges * rng.uniform(35, 60)


def _inclusion(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(rng.integers(3, 14)):
            x, y = rng.uniform(0, size, 2)
            length, width = rng.uniform(4, 30), rng.uniform(1.0, 3.0)
            d.ellipse([x - length / 2, y - width / 2, x + length / 2, y + width / 2], fill=255)

    mask = ndimage.gaussian_filter(_draw_mask(size, draw), 1.0)
    return img - mask * rng.uniform(50, 80)


def _patches(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(10, 18))
    field /= field.std() + 1e-9
    blotch = ndimage.gaussian_filter((field > rng.uniform(0.3, 0.9)).astype(float), 3)
    sign = -1 if rng.random() < 0.7 else 1
    return img + sign * blotch * rng.uniform(40, 70)


def _pitted_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)
    centre = rng.uniform(0.2 * size, 0.8 * size, 2)
    spread = rng.uniform(0.15, 0.35) * size

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(rng.integers(40, 120)):
            pos = np.asarray(rng.normal(centre, spread))
            x, y = pos
            r = rng.uniform(0.8, 2.8)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    mask = ndimage.gaussian_filter(_draw_mask(size, draw), 0.6)
    return img - mask * rng.uniform(45, 75)


def _rolled_in_scale(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(rng.integers(8, 25)):
            x, y = rng.uniform(0, size, 2)
            w, h = rng.uniform(6, 22), rng.uniform(2, 7)
            poly = [(x + w * np.cos(a) * rng.uniform(0.6, 1.1), y + h * np.sin(a) * rng.uniform(0.6, 1.1))
                    for a in np.linspace(0, 2 * np.pi, 9)[:-1]]
            d.polygon(poly, fill=255)

    flakes = _draw_mask(size, draw)
    rim = np.clip(flakes - ndimage.binary_erosion(flakes > 0.5, iterations=2), 0, 1)
    mottle = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.2) * 25
    body = ndimage.gaussian_filter(flakes, 0.8) * (rng.uniform(25, 40) + mottle)
    return img - body + rim * rng.uniform(70, 100)


def _scratches(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _steel_background(rng, size)
    angle = rng.uniform(0, np.pi)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(rng.integers(1, 5)):
            a = angle + rng.normal(0, 0.08)
            cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
            half = rng.uniform(0.3, 0.7) * size
            dx, dy = np.cos(a) * half, np.sin(a) * half
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(1, 4)))

    mask = ndimage.gaussian_filter(_draw_mask(size, draw), 0.7)
    sign = 1 if rng.random() < 0.6 else -1
    return img + sign * mask * rng.uniform(50, 80)


TEXTURES: dict[str, Texture] = dict(
    zip(NEU_CLASSES, (_crazing, _inclusion, _patches, _pitted_surface, _rolled_in_scale, _scratches), strict=True)
)


def demo_image(class_name: str, index: int, seed: int, size: int = 200) -> Image.Image:
    rng = np.random.default_rng(derive_seed("demo", seed, class_name, index))
    pixels = TEXTURES[class_name](rng, size)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def write_demo_dataset(out_dir: Path, classes: list[str], per_class: int, size: int, seed: int) -> int:
    """Write `out_dir/<class>/<class>_<i>.png` (class-per-folder layout); returns the number of images."""
    unknown = [c for c in classes if c not in TEXTURES]
    if unknown:
        raise ValueError(
            f"classes: the demo generator knows only {', '.join(TEXTURES)}; got {', '.join(unknown)}. "
            "Set data.source to a folder of your own images for other classes."
        )
    count = 0
    for cls in classes:
        (out_dir / cls).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(per_class), desc=f"demo {cls}", leave=False):
            demo_image(cls, i, seed, size).save(out_dir / cls / f"{cls}_{i:04d}.png")
            count += 1
    return count
