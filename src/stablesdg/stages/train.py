"""Stage `train`: the real-only baseline and the real+synthetic classifier on the same real splits, evaluated on
the same real test set (asserted by hash), each logged as an MLflow run; the better one is handed to the
registry with its evidence."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import mlflow
import numpy as np
import torch
import torchvision
from mlflow.models import infer_signature
from torch import nn

from .. import registry, tracking
from ..classifier import (
    EpochRecord,
    Evaluation,
    ImageSet,
    evaluate,
    misclassified_grid,
    save_weights,
    split_hash,
    train_classifier,
)
from ..comparison import (
    VARIANTS,
    LineScore,
    Splits,
    VariantResult,
    gain,
    line_score,
    load_splits,
    repeated_gain,
    scorer_on_test_set,
    variant_synthetic,
    variant_train_set,
)
from ..config import Params
from ..preprocess import PreprocessSpec
from ..provenance import gain_stats
from ..utils import sha256_tree, write_json
from ..viz import confusion_matrix_image, line_images_plot, save_image
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

SUMMARY_FILE = "summary.json"  # the full train report in --reports; metrics/train.json holds train_metrics()
CHAMPION_FILE = "champion.json"  # champion_param(): the export stage's DVC param


def write_history_csv(path: Path, history: Sequence[EpochRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "val_accuracy", "val_macro_f1"])
        for r in history:
            writer.writerow([r.epoch, f"{r.train_loss:.6f}", f"{r.val_accuracy:.6f}", f"{r.val_macro_f1:.6f}"])
    return path


def write_confusion_csv(path: Path, test: ImageSet, predictions: np.ndarray, class_names: Sequence[str]) -> Path:
    """One row per test image (DVC's confusion template counts them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        for actual, predicted in zip(test.y.tolist(), predictions.tolist(), strict=True):
            writer.writerow([class_names[actual], class_names[predicted]])
    return path


def model_signature(spec: PreprocessSpec, num_classes: int) -> tuple[Any, np.ndarray]:
    """Signature with a dynamic (-1) batch dimension for input and logits."""
    h, w = spec.input_size
    example: np.ndarray = np.zeros((1, spec.input_channels, h, w), np.float32)
    return infer_signature(example, np.zeros((1, num_classes), np.float32)), example


def log_classifier(model: nn.Module, spec: PreprocessSpec) -> str:
    """Log the model (pickle format: keeps the batch dimension dynamic, unlike pt2) and its preprocess spec."""
    signature, example = model_signature(spec, len(spec.class_names))
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=example,
        # Explicit requirements skip MLflow's slow dependency inference subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"],
    )
    mlflow.log_dict(spec.to_dict(), "preprocess.json")
    return info.model_uri


def _log_evaluation(evaluation: Evaluation, spec: PreprocessSpec, test: ImageSet, variant: str,
                    reports_dir: Path) -> None:
    names = spec.class_names
    metrics = {"test_accuracy": evaluation.accuracy, "test_macro_f1": evaluation.macro_f1}
    for cls, p, r in zip(names, evaluation.precision, evaluation.recall, strict=True):
        metrics[f"test_precision_{cls}"], metrics[f"test_recall_{cls}"] = p, r
    mlflow.log_metrics(metrics)
    confusion = confusion_matrix_image(evaluation.confusion, names, f"{variant}: test confusion")
    save_image(confusion, reports_dir / f"confusion_{variant}.png")
    tracking.log_image(confusion, "confusion_matrix.png")
    grid = misclassified_grid(test, evaluation.predictions, names)
    save_image(grid, reports_dir / f"misclassified_{variant}.png")
    tracking.log_image(grid, "misclassified.png")


def line_images_file(reports_dir: Path, variant: str) -> Path:
    return reports_dir / f"line_images_{variant}.png"


def log_line_images(model: nn.Module, splits: Splits, variant: str, reports_dir: Path) -> tuple[LineScore | None,
                                                                                             Path | None]:
    """Score the model on the imported line images (split `line`) and plot them per class: the PNG goes to
    reports_dir/line_images_<variant>.png and to the run (`line_images.png`). None, None when no line image
    was imported."""
    if splits.line is None:
        return None, None
    plot_file = line_images_file(reports_dir, variant)
    score = line_score(model, splits.line, splits.spec.class_names)
    numbers = score.to_dict()
    mlflow.log_metrics({"line_images": numbers["images"], "line_accuracy": numbers["accuracy"],
                        **{f"line_accuracy_{cls}": rec["accuracy"] for cls, rec in numbers["per_class"].items()
                           if rec["accuracy"] is not None}})
    plot = line_images_plot(score.class_names, score.images, score.accuracy(),
                            f"{variant}: line images per class and its accuracy on them")
    save_image(plot, plot_file)
    tracking.log_image(plot, "line_images.png")
    return score, plot_file


def train_variant(variant: str, splits: Splits, params: Params, inputs: Sequence[Path],
                  reports_dir: Path, weights_dir: Path | None = None) -> VariantResult:
    """Train, evaluate on the real test set and log one variant as a nested MLflow run."""
    synthetic = variant_synthetic(splits, variant)
    train = variant_train_set(splits, variant, params.classifier)
    test_hash = split_hash(splits.test.paths, splits.root)  # of the images this run is really evaluated on
    tags = {"variant": variant, "test_set_sha256": test_hash, "primary_metric": params.classifier.primary_metric,
            "n_train_real": len(splits.train), "n_train_synthetic": len(synthetic) if synthetic else 0,
            "epoch_size": len(train), "baseline_steps": params.classifier.baseline_steps}
    with tracking.stage_run("train", params, inputs, run_name=variant, nested=True, extra_tags=tags) as run:
        def log_epoch(r: EpochRecord) -> None:
            mlflow.log_metrics({"train_loss": r.train_loss, "val_accuracy": r.val_accuracy,
                                "val_macro_f1": r.val_macro_f1}, step=r.epoch)

        result = train_classifier(train, splits.val, splits.spec, params.classifier, params.seed, log_epoch, variant)
        evaluation = evaluate(result.model, splits.test, len(splits.spec.class_names))
        mlflow.log_metrics({"best_epoch": result.best_epoch, f"best_val_{params.classifier.primary_metric}":
                            result.best_score})
        _log_evaluation(evaluation, splits.spec, splits.test, variant, reports_dir)
        line, line_plot = log_line_images(result.model, splits, variant, reports_dir)
        write_history_csv(reports_dir / f"history_{variant}.csv", result.history)
        write_confusion_csv(reports_dir / f"confusion_{variant}.csv", splits.test, evaluation.predictions,
                            splits.spec.class_names)
        mlflow.log_artifact(str(reports_dir / f"history_{variant}.csv"))
        model_uri = log_classifier(result.model, splits.spec)
        if weights_dir is not None:
            save_weights(result.model, splits.spec, params.classifier.backbone, weights_dir / f"{variant}.safetensors")
    return VariantResult(variant, evaluation, result, run.info.run_id, model_uri, test_hash,
                         len(splits.train), len(synthetic) if synthetic else 0, len(train), line, line_plot)


def run_training(params: Params, processed_dir: Path, synthetic_dir: Path, reports_dir: Path,
                 fid_file: Path | None = None, register: bool = True, weights_dir: Path | None = None,
                 fid_report: Path | None = None, grids_dir: Path | None = None) -> dict:
    """Both variants, their comparison, the full train report (`train_metrics` picks the declared metrics from
    it) and (optionally) the registry step with its model card."""
    splits = load_splits(processed_dir, synthetic_dir, params)
    inputs = [processed_dir, synthetic_dir]
    for stale in (weights_dir / f"{v}.safetensors" for v in VARIANTS) if weights_dir else ():
        stale.unlink(missing_ok=True)  # a skipped variant must not leave an older run's weights behind
    for stale in (line_images_file(reports_dir, v) for v in VARIANTS):
        stale.unlink(missing_ok=True)  # nor an older run's line-image plot (drawn only when there are line images)
    summary: dict = {"primary_metric": params.classifier.primary_metric, "test_set_sha256": splits.test_hash,
                     "backbone": params.classifier.backbone, "input_size": params.classifier.input_size,
                     "line_images": len(splits.line) if splits.line else 0}
    extra = {"test_set_sha256": splits.test_hash, "synthetic_sha256": _synthetic_hash(synthetic_dir)}
    with tracking.stage_run("train", params, inputs, run_name="train", extra_tags=extra) as parent:
        results = {"real_only": train_variant("real_only", splits, params, inputs, reports_dir, weights_dir)}
        summary["real_only"] = results["real_only"].summary(splits.spec.class_names)
        if splits.synthetic is None:
            click.echo(f"train: real_plus_synthetic skipped: {splits.skip_reason}")
            summary["real_plus_synthetic"] = {"skipped": True, "reason": splits.skip_reason}
            summary["gain"] = None
        else:
            results["real_plus_synthetic"] = train_variant("real_plus_synthetic", splits, params, inputs, reports_dir,
                                                          weights_dir)
            summary["real_plus_synthetic"] = results["real_plus_synthetic"].summary(splits.spec.class_names)
            summary["gain"] = gain(results["real_plus_synthetic"], results["real_only"])
            mlflow.log_metrics({f"gain_{k}": v for k, v in summary["gain"].items()})
            if params.classifier.repeats > 1:
                first = {v: r.evaluation for v, r in results.items()}
                summary["repeats"] = repeated_gain(splits, params.classifier, params.seed, first)
                mlflow.log_metrics({k: v for k, v in summary["repeats"].items() if k.endswith(("_mean", "_std"))})
        hashes = {r.test_hash for r in results.values()}
        if len(hashes) != 1:
            raise RuntimeError(f"variants were evaluated on different test sets: {hashes}")
        mlflow.set_tag("same_test_set", "true")
        summary["same_test_set"] = True
        if register:
            test = registry.ComparisonSet(splits.test_hash, splits.spec, scorer_on_test_set(splits))
            evidence = registry.Evidence(processed_dir, synthetic_dir, fid_file, fid_report, grids_dir)
            summary["registered"] = registry.register_best(
                params.tracking.registered_model, params.classifier, list(results.values()), test,
                summary.get("gain"), parent.info.run_id, evidence, summary.get("repeats"),
            ).to_dict()
        mlflow.log_dict(summary, "train.json")
    return summary


def train_metrics(summary: dict) -> dict[str, float]:
    """What metrics/train.json declares to DVC: the figures compared across experiments, under short flat keys
    rounded to 3 decimals (`dvc exp show` makes one column per key and must fit 120 columns; one test image
    of 120 is 0.008). `acc`/`f1` are
    the real+synthetic model's (real-only's when no synthetic set), `gain`/`gain_sd` its macro-F1 gain over
    real-only (mean, sample std over `classifier.repeats` seeds). Per class, ids and hashes: the report."""
    augmented = summary.get("real_plus_synthetic") or {}
    model = summary["real_only"] if augmented.get("skipped") or not augmented else augmented
    out = {"acc": model["accuracy"], "f1": model["macro_f1"]}
    stats = gain_stats(summary.get("gain"), summary.get("repeats"))
    if stats:
        out["gain"] = stats["mean"]
        if stats["std"] is not None:
            out["gain_sd"] = stats["std"]
    return {k: round(float(v), 3) for k, v in out.items()}


def champion_param(summary: dict) -> dict[str, str]:
    """reports/train/champion.json: the registry's champion after this training, which the export stage reads
    as a DVC *param*: export re-runs when the champion changes, and `dvc exp show` shows a short version
    number instead of the 32-character md5 column a file dependency on train's outputs would add."""
    registered = summary.get("registered") or {}
    champion = registered.get("version") if registered.get("alias") == "champion" else registered.get("champion_before")
    return {"champion": str(champion or "none")}


def _synthetic_hash(synthetic_dir: Path) -> str:
    return sha256_tree(synthetic_dir) if synthetic_dir.exists() else "none"


@click.command("train")
@params_option
@path_option("--processed", default=PROCESSED, file_okay=False)
@path_option("--synthetic", default=SYNTHETIC, file_okay=False)
@path_option("--fid", "fid_file", default=FID_METRICS, dir_okay=False)
@path_option("--fid-report", default=FID_REPORT, dir_okay=False, help="Per-class FID/KID for the model card.")
@path_option("--grids", "grids_dir", default=GRIDS, file_okay=False,
             help="Real-vs-synthetic grids (<class>.png) for the model card.")
@path_option("--metrics", "metrics_file", default="metrics/train.json", dir_okay=False,
             help="The few figures DVC compares (see train_metrics).")
@path_option("--reports", default="reports/train", file_okay=False,
             help="Histories, confusion matrices and summary.json (the full train report).")
@path_option("--weights", "weights_dir", default="models/classifier", file_okay=False,
             help="Where each variant's trained weights are written.")
@click.option("--register/--no-register", default=True, show_default=True,
              help="Register the better variant in the MLflow model registry.")
@cli_errors
def train_command(params_path: str, processed: Path, synthetic: Path, fid_file: Path, fid_report: Path,
                  grids_dir: Path, metrics_file: Path, reports: Path, weights_dir: Path, register: bool) -> None:
    """Train the real-only baseline and the real+synthetic classifier; compare them on the real test set."""
    params = load_or_exit(params_path)
    summary = run_training(params, processed, synthetic, reports, fid_file, register, weights_dir, fid_report,
                           grids_dir)
    write_json(reports / SUMMARY_FILE, summary)
    write_json(reports / CHAMPION_FILE, champion_param(summary))
    write_json(metrics_file, train_metrics(summary))
    metric = params.classifier.primary_metric
    line = f"train: real_only test {metric}={summary['real_only'][metric]:.4f}"
    if summary["gain"] is not None:
        line += (f", real_plus_synthetic {summary['real_plus_synthetic'][metric]:.4f} "
                 f"(gain {summary['gain'][metric]:+.4f})")
    if "repeats" in summary:
        rep = summary["repeats"]
        line += (f"; over {len(rep['seeds'])} seeds gain {rep[f'gain_{metric}_mean']:+.4f} "
                 f"+/- {rep[f'gain_{metric}_std']:.4f}")
    click.echo(line + f" -> {metrics_file}, {reports / SUMMARY_FILE}")
    best = summary.get("registered", {}).get("variant", "real_only")
    scored = summary[best].get("line_images")
    click.echo(f"line images: {scored['images']}, {best} accuracy on them {scored['accuracy']:.4f} -> "
               f"{line_images_file(reports, best)}" if scored else "line images: none imported (no `line` split)")
    if "registered" in summary:
        reg = summary["registered"]
        click.echo(f"registry: {reg['model_name']} v{reg['version']} ({reg['variant']}) -> @{reg['alias']}: "
                   f"{reg['reason']}")
