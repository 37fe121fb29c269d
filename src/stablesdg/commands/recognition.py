"""Recognition table: does synthetic data help, above the classifier's own augmentation, over seeds?

For each backbone initialisation (from scratch, and from the surface-pretrained weights when given) and each
seed, three classifiers are trained on the same real splits, all with the classifier's own augmentation, and scored
on the same real test set: real only (the pipeline's baseline), real only repeated to the size of real + synthetic
(as many optimizer steps as the synthetic arm: an epoch over 60 real images is 2 steps, over 360 images 12, so
without it part of a "gain" would be extra training), and real + synthetic. Gains are paired by seed: mean and
sample std, against both real-only arms.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
import torch

try:  # MLflow is optional here: `--no-track` runs where it is not installed (a lent GPU machine)
    import mlflow

    from .. import tracking
except ImportError:  # pragma: no cover - exercised on such a machine only
    mlflow = tracking = None  # type: ignore[assignment]
from ..comparison import (
    GAIN_METRICS,
    Splits,
    TrainSet,
    gain_cell,
    load_splits,
    markdown_table,
    mean_std_cell,
    paired_gains,
    run_arms,
    seed_stats,
    variant_train_set,
)
from ..config import ClassifierConfig, Params
from ..stages.common import load_or_exit, params_option
from ..utils import pick_device, write_json

ARMS = (  # (name, label, training set)
    ("real", "real only", "real"),
    ("real_equal_steps", "real only, as many steps as real + synthetic", "repeated"),
    ("real_synthetic", "real + synthetic", "real+synthetic"),
)


def init_configs(cfg: ClassifierConfig, weights: Path | None) -> dict[str, ClassifierConfig]:
    """The backbone initialisations to compare: from scratch, and from `weights` when given."""
    out = {"scratch": replace(cfg, pretrained=False, weights_path=None)}
    if weights is not None:
        out["surface_pretrained"] = replace(cfg, pretrained=True, weights_path=str(weights))
    return out


def training_set(which: str) -> TrainSet:
    """An arm's training set: the train stage's variants, with the real-only one at both baselines."""
    variant, steps = {"real": ("real_only", "epochs"), "repeated": ("real_only", "equal"),
                      "real+synthetic": ("real_plus_synthetic", None)}[which]
    return lambda splits, cfg: variant_train_set(splits, variant, replace(cfg, baseline_steps=steps or
                                                                          cfg.baseline_steps))


def arms_table(splits: Splits, cfg: ClassifierConfig, seeds: list[int]) -> dict:
    """Every arm at every seed: test accuracy / macro-F1, and the paired gains of real + synthetic."""
    if splits.synthetic is None:
        raise click.ClickException(f"no synthetic images: {splits.skip_reason}")
    evaluations = run_arms(splits, cfg, {arm: training_set(which) for arm, _, which in ARMS}, seeds)
    out: dict = {arm: {m: seed_stats([e.metric(m) for e in evals]) for m in GAIN_METRICS}
                 for arm, evals in evaluations.items()}
    for m in GAIN_METRICS:
        out[f"gain_{m}"] = seed_stats(paired_gains(evaluations["real_synthetic"], evaluations["real"], m))
        out[f"gain_equal_steps_{m}"] = seed_stats(paired_gains(evaluations["real_synthetic"],
                                                               evaluations["real_equal_steps"], m))
    return out


def markdown(result: dict) -> str:
    """Macro-F1 mean ± std per arm and initialisation, and the paired gain."""
    header = ["initialisation", *(label for _, label, *_ in ARMS), "gain over real only", "gain over equal steps"]
    rows = [[init, *(mean_std_cell(rec[a]["macro_f1"]) for a, *_ in ARMS),
             *(gain_cell(rec[key]) for key in ("gain_macro_f1", "gain_equal_steps_macro_f1"))]
            for init, rec in result["inits"].items()]
    lines = [f"# Recognition: test macro-F1, mean ± std over {len(result['seeds'])} seeds "
             f"(k = {result['k_shot']}, {result['n_test']} test images, backbone {result['backbone']})", "",
             *markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def recognition(params: Params, processed: Path, synthetic: Path, seeds: int, weights: Path | None) -> dict:
    splits = load_splits(processed, synthetic, params)
    seed_list = [params.seed + i for i in range(seeds)]
    started = time.time()
    inits = {name: arms_table(splits, cfg, seed_list) for name, cfg in init_configs(params.classifier, weights).items()}
    return {"backbone": params.classifier.backbone, "k_shot": params.data.k_shot, "seeds": seed_list,
            "n_train_real": len(splits.train), "n_train_synthetic": len(splits.synthetic or []),
            "n_test": len(splits.test), "test_set_sha256": splits.test_hash,
            "weights": str(weights) if weights else None, "inits": inits, "device": _device_name(params),
            "seconds": round(time.time() - started, 1)}


def _device_name(params: Params) -> str:
    device = pick_device(params.classifier.device)
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


@click.command("recognition")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--synthetic", default="data/synthetic", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(2))
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="surface-pretrained backbone (`stablesdg pretrain backbone`) to compare with from-scratch")
@click.option("--out", default="reports/recognition", show_default=True, type=click.Path(path_type=Path))
@click.option("--track/--no-track", default=True, show_default=True,
              help="record an MLflow run (--no-track: only the report files, e.g. on a machine without MLflow)")
def recognition_command(params_path: str, processed: Path, synthetic: Path, seeds: int, weights: Path | None,
                        out: Path, track: bool) -> None:
    """Real only (as is / repeated to equal steps) vs real + synthetic, over seeds and backbone initialisations."""
    params = load_or_exit(params_path)
    if not track:
        write_report(recognition(params, processed, synthetic, seeds, weights), out)
        return
    if tracking is None:
        raise click.ClickException("MLflow is not installed here: run with --no-track")
    with tracking.stage_run("recognition", params, inputs=[processed, synthetic]):
        result = recognition(params, processed, synthetic, seeds, weights)
        write_report(result, out)
        mlflow.log_metrics({f"{init}_{k}_{s}": rec[k][s] for init, rec in result["inits"].items()
                            for k in ("gain_macro_f1", "gain_equal_steps_macro_f1", "gain_accuracy")
                            for s in ("mean", "std")})
        mlflow.log_artifact(str(out / "recognition.md"))


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recognition.json", result)
    (out / "recognition.md").write_text(markdown(result))
    click.echo((out / "recognition.md").read_text())
