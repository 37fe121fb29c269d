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


def _pyplot():
    import matplotlib  # lazy: slow to import, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_image(fig) -> Image.Image:
    """The drawn figure as an RGB image (its size: figsize x dpi), and the figure closed."""
    fig.tight_layout()
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    _pyplot().close(fig)
    return img


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Image.Image:
    fig, ax = _pyplot().subplots(figsize=(1.2 + 0.9 * len(class_names), 1.0 + 0.8 * len(class_names)), dpi=100)
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
    return _figure_image(fig)


def line_plot(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str = "") -> Image.Image:
    fig, ax = _pyplot().subplots(figsize=(6, 4), dpi=100)
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
    return _figure_image(fig)


LINE_IMAGES_PLOT_SIZE = (700, 400)  # pixels: figsize (7, 4) at 100 dpi


def line_images_plot(class_names: Sequence[str], images: Sequence[int], accuracy: Sequence[float | None],
                     title: str = "") -> Image.Image:
    """Per class, two bars: how many line images came back (left axis) and the model's accuracy on them (right
    axis, 0-1; no bar where the class has no line image)."""
    fig, ax = _pyplot().subplots(figsize=(LINE_IMAGES_PLOT_SIZE[0] / 100, LINE_IMAGES_PLOT_SIZE[1] / 100), dpi=100)
    x = np.arange(len(class_names))
    counts = ax.bar(x - 0.2, images, 0.4, color="#4c78a8", label="line images")
    ax.bar_label(counts, fmt="%d")
    ax.set_ylim(0, 1.2 * max([*images, 1]))  # room for the labels above the bars
    ax.set_ylabel("line images")
    ax.set_xticks(x, class_names, rotation=30, ha="right")
    right = ax.twinx()
    scored = [(i, a) for i, a in enumerate(accuracy) if a is not None]
    bars = right.bar([x[i] + 0.2 for i, _ in scored], [a for _, a in scored], 0.4, color="#f58518",
                     label="accuracy on them")
    right.bar_label(bars, fmt="%.2f")
    right.set_ylim(0, 1.2)
    right.set_ylabel("accuracy on them")
    ax.legend(handles=[counts, bars], loc="upper left", fontsize="small")
    if title:
        ax.set_title(title)
    return _figure_image(fig)
