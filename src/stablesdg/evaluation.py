"""Synthetic-set evaluation (the library side of the `evaluate` stage): per class, FID/KID of the final synthetic
set against the real TEST images, its novelty, the SSIM of each synthetic image to its nearest train image and
how much fine detail it keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import heldout_paths, split_paths
from .metrics import Scorer, detail_ratio, load_image, metric_keys, nearest_distances, novelty, ssim

# The evaluate metrics averaged over classes, in report order: (the per-class key, its short name in
# metrics/fid.json; None: in the evaluate report only). "fid" and "kid_mean" stand for the feature net's names
# (`metrics.metric_keys`: fid_surface, kid_surface_mean). Adding a metric is its function in metrics.py, and here
# a row and its per-class value in `evaluate_sets`. The registry tags and the ONNX provenance keep mean FID and
# KID only (`provenance.short_name`): that contract is the line runtime's (deploy/ PROVENANCE_KEYS).
EVALUATE_MEANS: tuple[tuple[str, str | None], ...] = (
    ("fid", "fid"), ("kid_mean", "kid"), ("novelty", "novelty"), ("nearest_train_ssim", None), ("detail_ratio", None),
)


def closeness(scorer: Scorer, processed: Path, cls: str, fake: list[Path]) -> dict[str, float]:
    """How close the synthetic images are to the k train images: novelty (1 = as far as a held-out real image)
    and the median SSIM between each synthetic image and its nearest train image (1 = a copy)."""
    train = split_paths(processed, cls, "train")
    train_feats, fake_feats = scorer.features(train, "train features"), scorer.features(fake)
    _, nearest = nearest_distances(fake_feats, train_feats)
    grey = lambda item: np.asarray(load_image(item).convert("L"), dtype=np.uint8)  # noqa: E731
    ssims = [ssim(grey(f), grey(train[j])) for f, j in zip(fake, nearest.tolist(), strict=True)]
    return {"novelty": novelty(fake_feats, scorer.features(heldout_paths(processed, cls)), train_feats),
            "nearest_train_ssim": float(np.median(ssims))}


def evaluate_sets(processed: Path, synthetic: dict[str, list[Path]], scorer: Scorer) -> dict:
    """The evaluate report: per-class FID/KID of each synthetic set against the class's real TEST images, its
    closeness to the train images, and the means over classes."""
    keys = scorer.keys
    per_class = {}
    for cls, fake in tqdm(synthetic.items(), desc="evaluate", unit="class"):
        real = split_paths(processed, cls, "test")
        per_class[cls] = {**scorer.score(real, fake), **closeness(scorer, processed, cls, fake),
                          "detail_ratio": detail_ratio(real, fake), "n_real": len(real), "n_synthetic": len(fake)}
    mean = {k: sum(v[k] for v in per_class.values()) / len(per_class)
            for k in (keys.get(name, name) for name, _ in EVALUATE_MEANS)}
    return {"feature_net": scorer.extractor.name, "per_class": per_class, "mean": mean}


def short_means(result: dict) -> dict[str, float]:
    """The means metrics/fid.json declares, under their short names whatever the feature net (the table's)."""
    keys, mean = metric_keys(result["feature_net"]), result["mean"]
    return {short: float(mean[keys.get(name, name)]) for name, short in EVALUATE_MEANS
            if short and keys.get(name, name) in mean}
