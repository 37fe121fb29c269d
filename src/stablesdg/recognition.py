"""Recognition table: does synthetic data help, above the classifier's own augmentation, over seeds?

For each backbone initialisation (from scratch, and from the surface-pretrained weights when given) and each
seed, three classifiers are trained on the same real splits and scored on the same real test set:
real only without augmentation, real only with the classifier's augmentation (the baseline the gain is measured
against), and real + synthetic with that augmentation. Gains are paired by seed: mean and sample std.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
import mlflow
import numpy as np

from . import tracking
from .classifier import GAIN_METRICS, Splits, combine, evaluate, load_splits, train_classifier
from .config import ClassifierConfig, Params
from .stages.common import load_or_exit, params_option
from .utils import write_json

ARMS = (
    ("real_noaug", "real only, no augmentation", False, False),
    ("real", "real only, with augmentation (baseline)", True, False),
    ("real_synthetic", "real + synthetic, with augmentation", True, True),
)


def init_configs(cfg: ClassifierConfig, weights: Path | None) -> dict[str, ClassifierConfig]:
    """The backbone initialisations to compare: from scratch, and from `weights` when given."""
    out = {"scratch": replace(cfg, pretrained=False, weights_path=None)}
    if weights is not None:
        out["surface_pretrained"] = replace(cfg, pretrained=True, weights_path=str(weights))
    return out


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"values": [round(v, 6) for v in values], "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def run_arms(splits: Splits, cfg: ClassifierConfig, seeds: list[int]) -> dict:
    """Every arm at every seed: test accuracy / macro-F1, and the paired gains of real + synthetic."""
    if splits.synthetic is None:
        raise click.ClickException(f"no synthetic images: {splits.skip_reason}")
    scores: dict[str, dict[str, list[float]]] = {a: {m: [] for m in GAIN_METRICS} for a, *_ in ARMS}
    for seed in seeds:
        for arm, _, augment, synthetic in ARMS:
            train = combine(splits.train, splits.synthetic if synthetic else None)
            result = train_classifier(train, splits.val, splits.spec, replace(cfg, augment=augment), seed,
                                      desc=f"{arm} seed {seed}")
            evaluation = evaluate(result.model, splits.test, len(splits.spec.class_names))
            for m in GAIN_METRICS:
                scores[arm][m].append(evaluation.metric(m))
    out: dict = {arm: {m: _stats(v) for m, v in per.items()} for arm, per in scores.items()}
    for m in GAIN_METRICS:
        out[f"gain_{m}"] = _stats(list(np.subtract(scores["real_synthetic"][m], scores["real"][m])))
        out[f"gain_over_noaug_{m}"] = _stats(list(np.subtract(scores["real_synthetic"][m], scores["real_noaug"][m])))
    return out


def markdown(result: dict) -> str:
    """Macro-F1 mean ± std per arm and initialisation, and the paired gain."""
    lines = [f"# Recognition: test macro-F1, mean ± std over {len(result['seeds'])} seeds "
             f"(k = {result['k_shot']}, {result['n_test']} test images, backbone {result['backbone']})", "",
             "| initialisation | " + " | ".join(label for _, label, *_ in ARMS)
             + " | gain (synthetic − baseline) | gain / std |",
             "|---|" + "---:|" * (len(ARMS) + 2)]
    for init, rec in result["inits"].items():
        cells = [f"{rec[a]['macro_f1']['mean']:.3f} ± {rec[a]['macro_f1']['std']:.3f}" for a, *_ in ARMS]
        g = rec["gain_macro_f1"]
        ratio = g["mean"] / g["std"] if g["std"] > 0 else float("inf")
        lines.append(f"| {init} | {' | '.join(cells)} | {g['mean'] * 100:+.1f} ± {g['std'] * 100:.1f} pt | "
                     f"{ratio:.1f} |")
    return "\n".join(lines) + "\n"


def recognition(params: Params, processed: Path, synthetic: Path, seeds: int, weights: Path | None) -> dict:
    splits = load_splits(processed, synthetic, params)
    seed_list = [params.seed + i for i in range(seeds)]
    started = time.time()
    inits = {name: run_arms(splits, cfg, seed_list) for name, cfg in init_configs(params.classifier, weights).items()}
    return {"backbone": params.classifier.backbone, "k_shot": params.data.k_shot, "seeds": seed_list,
            "n_train_real": len(splits.train), "n_train_synthetic": len(splits.synthetic or []),
            "n_test": len(splits.test), "test_set_sha256": splits.test_hash,
            "weights": str(weights) if weights else None, "inits": inits,
            "seconds": round(time.time() - started, 1)}


@click.command("recognition")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--synthetic", default="data/synthetic", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(2))
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="surface-pretrained backbone (`stablesdg pretrain backbone`) to compare with from-scratch")
@click.option("--out", default="reports/recognition", show_default=True, type=click.Path(path_type=Path))
def recognition_command(params_path: str, processed: Path, synthetic: Path, seeds: int, weights: Path | None,
                        out: Path) -> None:
    """Real only (without / with augmentation) vs real + synthetic, over seeds and backbone initialisations."""
    params = load_or_exit(params_path)
    with tracking.stage_run("recognition", params, inputs=[processed, synthetic]):
        result = recognition(params, processed, synthetic, seeds, weights)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "recognition.json", result)
        (out / "recognition.md").write_text(markdown(result))
        mlflow.log_metrics({f"{init}_{k}_{s}": rec[k][s] for init, rec in result["inits"].items()
                            for k in ("gain_macro_f1", "gain_accuracy") for s in ("mean", "std")})
        mlflow.log_artifact(str(out / "recognition.md"))
    click.echo((out / "recognition.md").read_text())
