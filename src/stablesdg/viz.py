"""Images people look at: contact sheets, real-vs-synthetic grids, confusion matrices, curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    cell: int = 96,
    pad: int = 2,
) -> Image.Image:
    """Rows of images as one RGB sheet, each row optionally labelled on its left."""
    n_cols = max((len(r) for r in rows), default=1)
    label_w = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    width = label_w + n_cols * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, max(height, cell)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = pad + r * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), row_labels[r], fill="black")
        for c, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.BILINEAR), (label_w + pad + c * (cell + pad), y))
    return sheet


def save_image(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Image.Image:
    import matplotlib  # lazy: slow to import, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(class_names), 1.0 + 0.8 * len(class_names)), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    peak = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return img


def line_plot(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str = "") -> Image.Image:
    import matplotlib  # lazy: slow to import, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return img
