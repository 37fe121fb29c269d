"""FID-guided choice of the generation settings per class (the library side of the `search` stage).

Search: a coarse grid over strength x guidance x steps, then a few refinement rounds around the best, each trial
generating the same images (same sources, same seeds) from the class's real TRAIN images and scoring them
against its held-out real images (VAL + the unused POOL, never the k train images). Each trial also reports its
FID noise (bootstrap std) and its novelty (nearest-train distance relative to held-out real images): a trial
below `search.min_novelty` only reproduces the train images and cannot win. The TEST split stays untouched
until `evaluate` and the classifier.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .config import Params, SearchConfig
from .errors import MissingInputError
from .generation import render
from .metrics import Scorer, detail_ratio, fid_bootstrap_std, mean_detail_energy, novelty
from .utils import derive_seed


@dataclass(frozen=True)
class Trial:
    strength: float
    guidance_scale: float
    steps: int
    scheduler: str = "ddim"


# --------------------------------------------------------------------------------------- trial plan
def grid_trials(cfg: SearchConfig) -> list[Trial]:
    return [Trial(float(s), float(g), int(n), name) for name in cfg.scheduler for s in cfg.strength
            for g in cfg.guidance_scale for n in cfg.steps]


def _spacing(values: list[float]) -> float:
    """Smallest gap between distinct grid values (0 for a single value: that axis is not refined)."""
    vals = sorted(set(values))
    return min((b - a for a, b in zip(vals, vals[1:], strict=False)), default=0.0)


def refine_trials(cfg: SearchConfig, best: Trial, tried: set[Trial], round_no: int) -> list[Trial]:
    """Half-steps around the best: strength ± gap/2^r, guidance ± gap/2^r, steps and sampler kept. At most 4."""
    ds = _spacing(cfg.strength) / 2**round_no
    dg = _spacing(cfg.guidance_scale) / 2**round_no
    out: list[Trial] = []
    for s, g in ((best.strength - ds, best.guidance_scale), (best.strength + ds, best.guidance_scale),
                 (best.strength, best.guidance_scale - dg), (best.strength, best.guidance_scale + dg)):
        trial = Trial(round(s, 4), round(g, 4), best.steps, best.scheduler)
        # guidance <= 1 switches classifier-free guidance off in diffusers: all such values are the same trial
        if 0.0 < trial.strength <= 1.0 and trial.guidance_scale >= 1.0 and trial not in tried and trial not in out:
            out.append(trial)
    return out


def trial_of(record: dict) -> Trial:
    return Trial(record["strength"], record["guidance_scale"], record["steps"], record.get("scheduler", "ddim"))


def cycled(sources: list[Path], n: int) -> list[Path]:
    if not sources:
        raise MissingInputError("no real training images for this class: run the ingest stage first")
    return [sources[i % len(sources)] for i in range(n)]


def seeds_for(seed: int, cls: str, purpose: str, n: int) -> list[int]:
    return [derive_seed(seed, cls, purpose, i) for i in range(n)]


# --------------------------------------------------------------------------------------- search
@dataclass
class SearchRun:
    """One class's search: the pipeline, the fixed sources/seeds, the real val images and the scorer."""

    params: Params
    cls: str
    pipe: Any
    sources: list[Path]
    real: list[Path]
    scorer: Scorer

    def run_trial(self, trial: Trial, stage: str) -> dict:
        n, cfg = self.params.search.images_per_trial, self.params.search
        start = time.perf_counter()
        images = render(self.pipe, self.params, self.cls, cycled(self.sources, n), trial.strength,
                        trial.guidance_scale, trial.steps, seeds_for(self.params.seed, self.cls, "search", n),
                        scheduler=trial.scheduler)
        real, fake = self.scorer.features(self.real, "real features"), self.scorer.features(images)
        scores = self.scorer.score_features(real, fake)
        seed = derive_seed(self.params.seed, self.cls, "bootstrap") % 2**32
        fid_std = fid_bootstrap_std(real, fake, cfg.bootstrap, seed)
        new = novelty(fake, real, self.scorer.features(self.sources, "train features"))
        detail = detail_ratio(self.real, images, self.real_detail_energy)
        return {**asdict(trial), "stage": stage, **scores, f"{self.scorer.keys['fid']}_std": round(fid_std, 6),
                "novelty": round(new, 6), "detail_ratio": round(detail, 6),
                "seconds": round(time.perf_counter() - start, 3)}

    @functools.cached_property
    def real_detail_energy(self) -> float:
        return mean_detail_energy(self.real)

    def novel(self, trial: dict) -> bool:
        """Not a near-copy of the train images (`search.min_novelty`)."""
        return trial["novelty"] >= self.params.search.min_novelty

    def eligible(self, trial: dict) -> bool:
        """Neither a near-copy of the train images (`search.min_novelty`) nor a blurred or a noisy one: fine
        detail within `search.min_detail_ratio` of real's either way (0.8: 0.8x-1.25x; at strength 1 the prior's
        noise has 10x real's fine detail, which is not sharper)."""
        cfg = self.params.search
        detail = trial.get("detail_ratio", 1.0)
        in_band = detail >= cfg.min_detail_ratio and (cfg.min_detail_ratio == 0 or detail <= 1 / cfg.min_detail_ratio)
        return self.novel(trial) and in_band

    def best(self, trials: list[dict]) -> dict:
        """Lowest FID among the eligible trials. If none is: among the novel ones the one whose fine detail is
        closest to real (detail_ratio nearest 1 on a log scale), else the most novel one (never a pure copy)."""
        eligible = [t for t in trials if self.eligible(t)]
        if eligible:
            return min(eligible, key=lambda t: t[self.scorer.keys["fid"]])
        novel = [t for t in trials if self.novel(t)]
        if novel:
            return min(novel, key=lambda t: abs(math.log(max(t.get("detail_ratio", 0.0), 1e-6))))
        return max(trials, key=lambda t: t["novelty"])

    def run(self, on_trial: Callable[[dict], None] | None = None) -> list[dict]:
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
            tried = {trial_of(t) for t in results}
            best_trial = trial_of(best)
            do(refine_trials(cfg, best_trial, tried, r), f"refine-{r}")
        return results


def fid_by_strength(trials: list[dict], fid_key: str) -> list[tuple[float, float]]:
    """For each strength, the best FID over the other settings (the DVC plot)."""
    best: dict[float, float] = {}
    for t in trials:
        best[t["strength"]] = min(best.get(t["strength"], float("inf")), t[fid_key])
    return sorted(best.items())


def _separation(trials: list[dict], best: dict, fid: str) -> float | None:
    """How many noise-sigmas the runner-up's FID lies above the winner's (None: no runner-up or no noise)."""
    others = sorted(t[fid] for t in trials if t is not best)
    sigma = float(np.hypot(best[f"{fid}_std"], np.median([t[f"{fid}_std"] for t in trials])))
    if not others or not math.isfinite(sigma) or sigma == 0:
        return None
    return round((others[0] - best[fid]) / sigma, 3)


def search_summary(run: SearchRun, trials: list[dict]) -> dict:
    """The search report: every trial (without wall-clock times), the winner, its noise and novelty."""
    keys = run.scorer.keys
    fid = keys["fid"]
    best = run.best(trials)
    return {
        "class": run.cls, "feature_net": run.scorer.extractor.name, "metric": fid, "real_split": "val+pool",
        "n_real": len(run.real), "n_train": len(run.sources), "images_per_trial": run.params.search.images_per_trial,
        "mode": run.params.generate.mode, "min_novelty": run.params.search.min_novelty,
        "min_detail_ratio": run.params.search.min_detail_ratio,
        "noise": {f"median_{fid}_std": float(np.median([t[f"{fid}_std"] for t in trials])),
                  "best_vs_runner_up_sigmas": _separation(trials, best, fid)},
        "rejected_as_copies": sum(not run.novel(t) for t in trials),
        "rejected_for_detail": sum(run.novel(t) and not run.eligible(t) for t in trials),
        "best": {**asdict(trial_of(best)), fid: best[fid], f"{fid}_std": best[f"{fid}_std"],
                 keys["kid_mean"]: best[keys["kid_mean"]], "novelty": best["novelty"],
                 "detail_ratio": best["detail_ratio"]},
        # wall-clock seconds go to MLflow only: the report is a DVC output and must not change between equal runs
        "trials": [{k: v for k, v in t.items() if k != "seconds"} for t in trials],
    }
