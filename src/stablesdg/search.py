"""FID-guided choice of the generation settings per class (`search`), and the final synthetic-set scores (`evaluate`).

Search: a coarse grid over strength x guidance x steps, then a few refinement rounds around the best, each trial
generating the same images (same sources, same seeds) from the class's real TRAIN images and scoring them
against its held-out real images (VAL + the unused POOL, never the k train images). Each trial also reports its
FID noise (bootstrap std) and its novelty (nearest-train distance relative to held-out real images): a trial
below `search.min_novelty` only reproduces the train images and cannot win. The TEST split stays untouched
until `evaluate` and the classifier.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from .config import Params, SearchConfig
from .metrics import (
    FeatureWeightsError,
    MetricsError,
    Scorer,
    fid_bootstrap_std,
    load_scorer,
    novelty,
)
from .options import load_or_exit, params_option
from .utils import derive_seed, pick_device, write_json


@dataclass(frozen=True)
class Trial:
    strength: float
    guidance_scale: float
    steps: int


# --------------------------------------------------------------------------------------- trial plan
def grid_trials(cfg: SearchConfig) -> list[Trial]:
    return [Trial(float(s), float(g), int(n)) for s in cfg.strength for g in cfg.guidance_scale for n in cfg.steps]


def _spacing(values: list[float]) -> float:
    """Smallest gap between distinct grid values (0 for a single value: that axis is not refined)."""
    vals = sorted(set(values))
    return min((b - a for a, b in zip(vals, vals[1:], strict=False)), default=0.0)


def refine_trials(cfg: SearchConfig, best: Trial, tried: set[Trial], round_no: int) -> list[Trial]:
    """Half-steps around the best: strength ± gap/2^r, guidance ± gap/2^r, steps kept. At most 4 trials."""
    ds = _spacing(cfg.strength) / 2**round_no
    dg = _spacing(cfg.guidance_scale) / 2**round_no
    out: list[Trial] = []
    for s, g in ((best.strength - ds, best.guidance_scale), (best.strength + ds, best.guidance_scale),
                 (best.strength, best.guidance_scale - dg), (best.strength, best.guidance_scale + dg)):
        trial = Trial(round(s, 4), round(g, 4), best.steps)
        # guidance <= 1 switches classifier-free guidance off in diffusers: all such values are the same trial
        if 0.0 < trial.strength <= 1.0 and trial.guidance_scale >= 1.0 and trial not in tried and trial not in out:
            out.append(trial)
    return out


def cycled(sources: list[Path], n: int) -> list[Path]:
    if not sources:
        raise click.ClickException("no real training images for this class: run the ingest stage first")
    return [sources[i % len(sources)] for i in range(n)]


def seeds_for(params: Params, cls: str, purpose: str, n: int) -> list[int]:
    return [derive_seed(params.seed, cls, purpose, i) for i in range(n)]


# --------------------------------------------------------------------------------------- search
@dataclass
class SearchRun:
    """One class's search: the pipeline, the fixed sources/seeds, the real val images and the scorer."""

    params: Params
    cls: str
    pipe: object
    sources: list[Path]
    real: list[Path]
    scorer: Scorer

    def run_trial(self, trial: Trial, stage: str) -> dict:
        from .generation import render

        n, cfg = self.params.search.images_per_trial, self.params.search
        start = time.perf_counter()
        images = render(self.pipe, self.params, self.cls, cycled(self.sources, n), trial.strength,
                        trial.guidance_scale, trial.steps, seeds_for(self.params, self.cls, "search", n))
        real, fake = self.scorer.features(self.real, "real features"), self.scorer.features(images)
        scores = self.scorer.score_features(real, fake)
        seed = derive_seed(self.params.seed, self.cls, "bootstrap") % 2**32
        fid_std = fid_bootstrap_std(real, fake, cfg.bootstrap, seed)
        new = novelty(fake, real, self.scorer.features(self.sources, "train features"))
        return {**asdict(trial), "stage": stage, **scores, f"{self.scorer.keys['fid']}_std": round(fid_std, 6),
                "novelty": round(new, 6), "seconds": round(time.perf_counter() - start, 3)}

    def best(self, trials: list[dict]) -> dict:
        """Lowest FID among trials novel enough; if none is, the most novel one (never a pure copy)."""
        novel = [t for t in trials if t["novelty"] >= self.params.search.min_novelty]
        if not novel:
            return max(trials, key=lambda t: t["novelty"])
        return min(novel, key=lambda t: t[self.scorer.keys["fid"]])

    def run(self, on_trial=None) -> list[dict]:
        """Grid, then refinement rounds; `on_trial(record)` sees each finished trial (MLflow child runs)."""
        cfg = self.params.search
        results: list[dict] = []

        def do(trials: list[Trial], stage: str) -> None:
            for trial in tqdm(trials, desc=f"search {self.cls} {stage}", unit="trial"):
                results.append(self.run_trial(trial, stage))
                if on_trial:
                    on_trial(results[-1])

        do(grid_trials(cfg), "grid")
        for r in range(1, (cfg.refine_rounds if cfg.refine else 0) + 1):
            best = self.best(results)
            tried = {Trial(t["strength"], t["guidance_scale"], t["steps"]) for t in results}
            best_trial = Trial(best["strength"], best["guidance_scale"], best["steps"])
            do(refine_trials(cfg, best_trial, tried, r), f"refine-{r}")
        return results


def fid_by_strength(trials: list[dict], fid_key: str) -> list[tuple[float, float]]:
    """For each strength, the best FID over the other settings (the DVC plot)."""
    best: dict[float, float] = {}
    for t in trials:
        best[t["strength"]] = min(best.get(t["strength"], float("inf")), t[fid_key])
    return sorted(best.items())


def write_search_outputs(out_dir: Path, cls: str, summary: dict) -> dict[str, Path]:
    from .viz import line_plot, save_image

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


def _separation(trials: list[dict], best: dict, fid: str) -> float | None:
    """How many noise-sigmas the runner-up's FID lies above the winner's (None: no runner-up or no noise)."""
    others = sorted(t[fid] for t in trials if t is not best)
    sigma = float(np.hypot(best[f"{fid}_std"], np.median([t[f"{fid}_std"] for t in trials])))
    if not others or not math.isfinite(sigma) or sigma == 0:
        return None
    return round((others[0] - best[fid]) / sigma, 3)


def _summary(run: SearchRun, trials: list[dict]) -> dict:
    keys = run.scorer.keys
    fid = keys["fid"]
    best = run.best(trials)
    return {
        "class": run.cls, "feature_net": run.scorer.extractor.name, "metric": fid, "real_split": "val+pool",
        "n_real": len(run.real), "n_train": len(run.sources), "images_per_trial": run.params.search.images_per_trial,
        "mode": run.params.generate.mode, "scheduler": run.params.generate.scheduler,
        "min_novelty": run.params.search.min_novelty,
        "noise": {f"median_{fid}_std": float(np.median([t[f"{fid}_std"] for t in trials])),
                  "best_vs_runner_up_sigmas": _separation(trials, best, fid)},
        "rejected_as_copies": sum(t["novelty"] < run.params.search.min_novelty for t in trials),
        "best": {"strength": best["strength"], "guidance_scale": best["guidance_scale"], "steps": best["steps"],
                 fid: best[fid], f"{fid}_std": best[f"{fid}_std"], keys["kid_mean"]: best[keys["kid_mean"]],
                 "novelty": best["novelty"]},
        # wall-clock seconds go to MLflow only: the report is a DVC output and must not change between equal runs
        "trials": [{k: v for k, v in t.items() if k != "seconds"} for t in trials],
    }


def search_class(params: Params, cls: str, processed: Path, adapter_dir: Path, out_dir: Path,
                 pipe=None, track: bool = True) -> dict:
    """Search one class; writes <cls>.json, <cls>_fid_vs_strength.csv/.png and returns the summary."""
    from .data import split_paths
    from .generation import load_adapted_pipeline

    scorer = load_scorer(params)
    real = heldout_paths(processed, cls)
    if len(real) < 2:
        raise MetricsError(f"{cls}: {len(real)} held-out (val + pool) images; FID needs at least 2 "
                           "(raise data.val_per_class)")
    if pipe is None:
        pipe = load_adapted_pipeline(params, cls, adapter_dir, pick_device(params.generate.device))
    run = SearchRun(params, cls, pipe, split_paths(processed, cls, "train"), real, scorer)
    if not track:
        summary = _summary(run, run.run())
        write_search_outputs(out_dir, cls, summary)
        return summary
    return _tracked_search(run, adapter_dir, processed, out_dir)


def heldout_paths(processed: Path, cls: str) -> list[Path]:
    """The class's real images that are neither train nor test: the search's FID reference."""
    from .data import split_paths

    return sorted([*split_paths(processed, cls, "val"), *split_paths(processed, cls, "pool")])


def _tracked_search(run: SearchRun, adapter_dir: Path, processed: Path, out_dir: Path) -> dict:
    """One MLflow parent run for the class, one nested child run per trial."""
    import mlflow

    from . import tracking

    fid = run.scorer.keys["fid"]

    def log_trial(t: dict) -> None:
        with mlflow.start_run(run_name=f"{run.cls}-s{t['strength']}-g{t['guidance_scale']}-n{t['steps']}",
                              nested=True, tags={"stage": "search-trial", "class": run.cls, "phase": t["stage"]}):
            mlflow.log_params({k: t[k] for k in ("strength", "guidance_scale", "steps")})
            mlflow.log_metrics({k: v for k, v in t.items()
                                if k.startswith(("fid", "kid")) or k in ("seconds", "novelty")})

    with tracking.stage_run("search", run.params, inputs=[adapter_dir, processed / "images" / run.cls],
                            run_name=f"search-{run.cls}", extra_tags={"class": run.cls,
                                                                      "feature_net": run.scorer.extractor.name}):
        summary = _summary(run, run.run(on_trial=log_trial))
        paths = write_search_outputs(out_dir, run.cls, summary)
        best = summary["best"]
        mlflow.log_params({f"best.{k}": best[k] for k in ("strength", "guidance_scale", "steps")})
        mlflow.log_metrics({f"best_{fid}": best[fid], "best_novelty": best["novelty"],
                            "best_strength": best["strength"],
                            "best_guidance_scale": best["guidance_scale"], "best_steps": best["steps"],
                            "trials": len(summary["trials"])})
        for path in paths.values():
            mlflow.log_artifact(str(path), artifact_path="search")
    return summary


@click.command("search")
@click.option("--class", "cls", required=True, help="defect class to search settings for")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--adapters", default="models/adapters", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default="reports/search", show_default=True, type=click.Path(path_type=Path))
def search_command(cls: str, params_path: str, processed: Path, adapters: Path, out: Path) -> None:
    """FID-guided grid + refinement over strength, guidance and steps for one class (held-out reference)."""

    params = load_or_exit(params_path)
    params.class_config(cls)
    try:
        summary = search_class(params, cls, processed, adapters / cls, out)
    except (FeatureWeightsError, MetricsError) as err:
        raise click.ClickException(str(err)) from None
    b, key = summary["best"], summary["metric"]
    click.echo(f"search {cls}: {len(summary['trials'])} trials, best strength {b['strength']}, guidance "
               f"{b['guidance_scale']}, steps {b['steps']} ({key} {b[key]:.3f}) -> {out / (cls + '.json')}")


# --------------------------------------------------------------------------------------- evaluate
def synthetic_paths(synthetic: Path, cls: str) -> list[Path]:
    paths = sorted((synthetic / cls).glob("*.png"))
    if len(paths) < 2:
        raise click.ClickException(f"{synthetic / cls}: {len(paths)} synthetic images; run "
                                   f"`dvc repro generate@{cls}` (or `stablesdg generate --class {cls}`) first")
    return paths


def evaluate_sets(params: Params, processed: Path, synthetic: Path, scorer: Scorer,
                  classes: list[str]) -> dict:
    """The evaluate report: per-class FID/KID of the synthetic set against the real TEST images, and their mean."""
    from .data import split_paths

    keys = scorer.keys
    per_class = {}
    for cls in tqdm(classes, desc="evaluate", unit="class"):
        real, fake = split_paths(processed, cls, "test"), synthetic_paths(synthetic, cls)
        per_class[cls] = {**scorer.score(real, fake), **closeness(scorer, processed, cls, fake),
                          "n_real": len(real), "n_synthetic": len(fake)}
    mean = {k: sum(v[k] for v in per_class.values()) / len(per_class)
            for k in (keys["fid"], keys["kid_mean"], "novelty", "nearest_train_ssim")}
    return {"feature_net": scorer.extractor.name, "per_class": per_class, "mean": mean}


def fid_metrics(result: dict) -> dict:
    """What metrics/fid.json declares to DVC: the means under short keys whatever the feature net (the param
    `metrics.feature_net` says which, and `dvc exp show` shows it when it changes); the per-class detail and
    the net's name go to the report (reports/evaluate/fid_per_class.json)."""
    from .provenance import means_of

    return {k: round(v, 4) for k, v in means_of(result).items() if k != "feature_net"}


def closeness(scorer: Scorer, processed: Path, cls: str, fake: list[Path]) -> dict[str, float]:
    """How close the synthetic images are to the k train images: novelty (1 = as far as a held-out real image)
    and the median SSIM between each synthetic image and its nearest train image (1 = a copy)."""
    from .data import split_paths
    from .metrics import load_image, nearest_distances
    from .prior import ssim

    train = split_paths(processed, cls, "train")
    train_feats, fake_feats = scorer.features(train, "train features"), scorer.features(fake)
    _, nearest = nearest_distances(fake_feats, train_feats)
    grey = lambda item: np.asarray(load_image(item).convert("L"), dtype=np.uint8)  # noqa: E731
    ssims = [ssim(grey(f), grey(train[j])) for f, j in zip(fake, nearest.tolist(), strict=True)]
    return {"novelty": novelty(fake_feats, scorer.features(heldout_paths(processed, cls)), train_feats),
            "nearest_train_ssim": float(np.median(ssims))}


def real_vs_synthetic_grid(real: list[Path], fake: list[Path], n: int = 8) -> Image.Image:
    from .viz import image_grid

    rows = [[Image.open(p).copy() for p in paths[:n]] for paths in (real, fake)]
    return image_grid(rows, ["real", "synthetic"])


@click.command("evaluate")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(path_type=Path))
@click.option("--synthetic", default="data/synthetic", show_default=True, type=click.Path(path_type=Path))
@click.option("--metrics", "metrics_path", default="metrics/fid.json", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--report", default="reports/evaluate/fid_per_class.json", show_default=True,
              type=click.Path(path_type=Path), help="Per-class FID/KID, novelty and counts (not a DVC metric).")
@click.option("--grids", default="reports/grids", show_default=True, type=click.Path(path_type=Path))
def evaluate_command(params_path: str, processed: Path, synthetic: Path, metrics_path: Path, report: Path,
                     grids: Path) -> None:
    """FID/KID of each class's final synthetic set against its real test images, plus real-vs-synthetic grids."""
    import mlflow

    from . import tracking
    from .data import split_paths
    from .viz import save_image

    params = load_or_exit(params_path)
    try:
        scorer = load_scorer(params)
        with tracking.stage_run("evaluate", params, inputs=[processed / "splits", synthetic],
                                extra_tags={"feature_net": scorer.extractor.name}):
            result = evaluate_sets(params, processed, synthetic, scorer, params.class_names)
            write_json(report, result)
            write_json(metrics_path, fid_metrics(result))
            for cls in params.class_names:
                grid = real_vs_synthetic_grid(split_paths(processed, cls, "test"), synthetic_paths(synthetic, cls))
                mlflow.log_artifact(str(save_image(grid, grids / f"{cls}.png")), artifact_path="grids")
            mlflow.log_metrics({f"{k}_{cls}": v for cls, rec in result["per_class"].items()
                                for k, v in rec.items()})
            mlflow.log_metrics({f"mean_{k}": v for k, v in result["mean"].items()})
            mlflow.log_artifact(str(report))
    except (FeatureWeightsError, MetricsError) as err:
        raise click.ClickException(str(err)) from None
    summary = ", ".join(f"{k} {v:.3f}" for k, v in result["mean"].items())
    click.echo(f"evaluate: mean {summary} over {len(result['per_class'])} classes -> {metrics_path}, {report}")
