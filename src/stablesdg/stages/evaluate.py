"""Stage `evaluate`: FID/KID, novelty and nearest-train SSIM of every class's final synthetic set against its
real test images; the means as DVC metrics, real-vs-synthetic grids."""

from __future__ import annotations

from pathlib import Path

import click
import mlflow
from PIL import Image

from .. import tracking
from ..data import split_paths, synthetic_paths
from ..errors import MissingInputError
from ..evaluation import evaluate_sets, short_means
from ..metrics import load_scorer
from ..utils import write_json
from ..viz import image_grid, save_image
from .common import (
    FID_METRICS,
    FID_REPORT,
    GRIDS,
    PROCESSED,
    SYNTHETIC,
    cli_errors,
    load_or_exit,
    params_option,
    path_option,
)


def synthetic_sets(synthetic: Path, classes: list[str]) -> dict[str, list[Path]]:
    """Each class's synthetic images; FID needs at least two."""
    sets = {}
    for cls in classes:
        paths = synthetic_paths(synthetic, cls)
        if len(paths) < 2:
            raise MissingInputError(f"{synthetic / cls}: {len(paths)} synthetic images; run "
                                    f"`dvc repro generate@{cls}` (or `stablesdg generate --class {cls}`) first")
        sets[cls] = paths
    return sets


def fid_metrics(result: dict) -> dict:
    """What metrics/fid.json declares to DVC: the means under short keys whatever the feature net (the param
    `metrics.feature_net` says which, and `dvc exp show` shows it when it changes); the per-class detail and
    the net's name go to the report (reports/evaluate/fid_per_class.json)."""
    return {k: round(v, 4) for k, v in short_means(result).items()}


def real_vs_synthetic_grid(real: list[Path], fake: list[Path], n: int = 8) -> Image.Image:
    rows = [[Image.open(p).copy() for p in paths[:n]] for paths in (real, fake)]
    return image_grid(rows, ["real", "synthetic"])


@click.command("evaluate")
@params_option
@path_option("--processed", default=PROCESSED)
@path_option("--synthetic", default=SYNTHETIC)
@path_option("--metrics", "metrics_path", default=FID_METRICS)
@path_option("--report", default=FID_REPORT, help="Per-class FID/KID, novelty and counts (not a DVC metric).")
@path_option("--grids", default=GRIDS)
@cli_errors
def evaluate_command(params_path: str, processed: Path, synthetic: Path, metrics_path: Path, report: Path,
                     grids: Path) -> None:
    """FID/KID of each class's final synthetic set against its real test images, plus real-vs-synthetic grids."""
    params = load_or_exit(params_path)
    scorer = load_scorer(params.metrics, params.seed)
    with tracking.stage_run("evaluate", params, inputs=[processed / "splits", synthetic],
                            extra_tags={"feature_net": scorer.extractor.name}):
        sets = synthetic_sets(synthetic, params.class_names)
        result = evaluate_sets(processed, sets, scorer)
        write_json(report, result)
        write_json(metrics_path, fid_metrics(result))
        for cls, fake in sets.items():
            grid = real_vs_synthetic_grid(split_paths(processed, cls, "test"), fake)
            mlflow.log_artifact(str(save_image(grid, grids / f"{cls}.png")), artifact_path="grids")
        mlflow.log_metrics({f"{k}_{cls}": v for cls, rec in result["per_class"].items()
                            for k, v in rec.items()})
        mlflow.log_metrics({f"mean_{k}": v for k, v in result["mean"].items()})
        mlflow.log_artifact(str(report))
    summary = ", ".join(f"{k} {v:.3f}" for k, v in result["mean"].items())
    click.echo(f"evaluate: mean {summary} over {len(result['per_class'])} classes -> {metrics_path}, {report}")
