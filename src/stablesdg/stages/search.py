"""Stage `search@<class>`: the FID-guided search over strength, guidance and steps for one class, with one MLflow
parent run per class and a nested run per trial; writes the report, the FID-vs-strength table and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import click
import mlflow

from .. import tracking
from ..config import Params
from ..data import heldout_paths, split_paths
from ..generation import load_adapted_pipeline
from ..metrics import MetricsError, load_scorer
from ..search import SearchRun, fid_by_strength, search_summary
from ..utils import pick_device, write_json
from ..viz import line_plot, save_image
from .common import (
    ADAPTERS,
    PROCESSED,
    SEARCH,
    class_option,
    cli_errors,
    load_for_class,
    params_option,
    path_option,
)


def write_search_outputs(out_dir: Path, cls: str, summary: dict) -> dict[str, Path]:
    fid_key = summary["metric"]
    points = fid_by_strength(summary["trials"], fid_key)
    paths = {"json": out_dir / f"{cls}.json", "csv": out_dir / f"{cls}_fid_vs_strength.csv",
             "png": out_dir / f"{cls}_fid_vs_strength.png"}
    write_json(paths["json"], summary)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strength", "fid"])  # column `fid` in every mode; the JSON names the feature net
        writer.writerows([s, f"{v:.6f}"] for s, v in points)
    plot = line_plot({cls: points}, "strength", f"best {fid_key}", f"{cls}: {fid_key} vs img2img strength")
    save_image(plot, paths["png"])
    return paths


def search_class(params: Params, cls: str, processed: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """Search one class; writes <cls>.json, <cls>_fid_vs_strength.csv/.png and returns the summary."""
    scorer = load_scorer(params.metrics, params.seed)
    real = heldout_paths(processed, cls)
    if len(real) < 2:
        raise MetricsError(f"{cls}: {len(real)} held-out (val + pool) images; FID needs at least 2 "
                           "(raise data.val_per_class)")
    pipe = load_adapted_pipeline(params.model, cls, adapter_dir, pick_device(params.generate.device))
    run = SearchRun(params, cls, pipe, split_paths(processed, cls, "train"), real, scorer)
    return tracked_search(run, adapter_dir, processed, out_dir)


def tracked_search(run: SearchRun, adapter_dir: Path, processed: Path, out_dir: Path) -> dict:
    """One MLflow parent run for the class, one nested child run per trial."""
    fid = run.scorer.keys["fid"]

    def log_trial(t: dict) -> None:
        with mlflow.start_run(run_name=f"{run.cls}-{t['scheduler']}-s{t['strength']}-g{t['guidance_scale']}-n{t['steps']}",
                              nested=True, tags={"stage": "search-trial", "class": run.cls, "phase": t["stage"]}):
            mlflow.log_params({k: t[k] for k in ("strength", "guidance_scale", "steps", "scheduler")})
            mlflow.log_metrics({k: v for k, v in t.items()
                                if k.startswith(("fid", "kid")) or k in ("seconds", "novelty", "detail_ratio")})

    with tracking.stage_run("search", run.params, inputs=[adapter_dir, processed / "images" / run.cls],
                            run_name=f"search-{run.cls}", extra_tags={"class": run.cls,
                                                                      "feature_net": run.scorer.extractor.name}):
        summary = search_summary(run, run.run(on_trial=log_trial))
        paths = write_search_outputs(out_dir, run.cls, summary)
        best = summary["best"]
        mlflow.log_params({f"best.{k}": best[k] for k in ("strength", "guidance_scale", "steps", "scheduler")})
        mlflow.log_metrics({f"best_{fid}": best[fid], "best_novelty": best["novelty"],
                            "best_detail_ratio": best["detail_ratio"],
                            "best_strength": best["strength"],
                            "best_guidance_scale": best["guidance_scale"], "best_steps": best["steps"],
                            "trials": len(summary["trials"])})
        for path in paths.values():
            mlflow.log_artifact(str(path), artifact_path="search")
    return summary


@click.command("search")
@class_option
@params_option
@path_option("--processed", default=PROCESSED)
@path_option("--adapters", default=ADAPTERS)
@path_option("--out", default=SEARCH)
@cli_errors
def search_command(cls: str, params_path: str, processed: Path, adapters: Path, out: Path) -> None:
    """FID-guided grid + refinement over strength, guidance and steps for one class (held-out reference)."""
    params = load_for_class(params_path, cls)
    summary = search_class(params, cls, processed, adapters / cls, out)
    b, key = summary["best"], summary["metric"]
    click.echo(f"search {cls}: {len(summary['trials'])} trials, best strength {b['strength']}, guidance "
               f"{b['guidance_scale']}, steps {b['steps']}, {b['scheduler']} ({key} {b[key]:.3f}) -> {out / (cls + '.json')}")
