"""search / evaluate / ablation on the built-in tiny SD model: real adapters, real generation, real MLflow store."""

from __future__ import annotations

import csv
import json
import math

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from conftest import make_processed, tiny_run_params

from stablesdg.adaptation import adapt_class
from stablesdg.commands.ablation import VARIANTS, ablation_command
from stablesdg.config import ConfigError, SearchConfig, load_params, parse_params
from stablesdg.generation import generate_class
from stablesdg.search import SearchRun, Trial, grid_trials, refine_trials
from stablesdg.stages.evaluate import evaluate_command
from stablesdg.stages.search import search_command

CLASSES = ["crazing", "scratches"]
RAW = tiny_run_params(
    4, 4, {"per_class": 4, "batch_size": 4, "steps": 4, "strength": 0.6},
        # strength 0.05 x 4 steps is no denoising step at all: the trial's images are the train images themselves
    search={"strength": [0.05, 0.8], "guidance_scale": [3.0], "steps": [4], "images_per_trial": 3,
            "refine": True, "refine_rounds": 1, "min_novelty": 0.5, "bootstrap": 5},
    metrics={"kid_subsets": 5},
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Processed data, the params file and trained adapters for both classes."""
    root = tmp_path_factory.mktemp("search")
    processed = make_processed(root, CLASSES, per_class=8, size=48, k_shot=3)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({**RAW, "metrics": {**RAW["metrics"], "cache_dir": str(root / "cache")}}))
    params = load_params(params_file)
    for cls in CLASSES:
        adapt_class(params, cls, processed, root / "adapters", checkpoint_root=root / "ckpt")
    return {"root": root, "processed": processed, "params_file": params_file, "params": params}


def invoke(command, args: list) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_search_writes_every_trial_the_best_and_the_plot(world, mlflow_store, tmp_path):
    root = world["root"]
    invoke(search_command, ["--class", "crazing", "--params", world["params_file"], "--processed",
                            world["processed"], "--adapters", root / "adapters", "--out", tmp_path / "search"])
    summary = json.loads((tmp_path / "search" / "crazing.json").read_text())
    trials = summary["trials"]
    assert summary["feature_net"] == "surface" and summary["metric"] == "fid_surface"
    assert summary["real_split"] == "val+pool" and summary["n_train"] == 3
    assert [t["stage"] for t in trials] == ["grid", "grid", "refine-1"], trials  # 0.8 +/- 0.375: one in range
    assert all(math.isfinite(t["fid_surface"]) and "seconds" not in t for t in trials)  # timings: MLflow only
    assert all(t["fid_surface_std"] > 0 for t in trials), "each trial reports its FID noise"
    copy = next(t for t in trials if t["strength"] == 0.05)
    # the train images themselves (only resized to the model's 32 px and back): a near-copy, below the gate
    assert copy["novelty"] < summary["min_novelty"] and summary["rejected_as_copies"] >= 1, copy
    novel = [t for t in trials if t["novelty"] >= 0.5]
    best = min(novel, key=lambda t: t["fid_surface"]) if novel else max(trials, key=lambda t: t["novelty"])
    assert summary["best"]["strength"] != 0.05, "a copy of the train images must never win"
    assert summary["best"] == {k: best[k] for k in ("strength", "guidance_scale", "steps", "scheduler", "fid_surface",
                                                     "fid_surface_std", "kid_surface_mean", "novelty",
                                                     "detail_ratio")}
    assert all(t["scheduler"] == "ddim" and t["detail_ratio"] > 0 for t in trials)
    assert set(summary["noise"]) == {"median_fid_surface_std", "best_vs_runner_up_sigmas"}
    rows = list(csv.reader((tmp_path / "search" / "crazing_fid_vs_strength.csv").open()))
    assert rows[0] == ["strength", "fid"]
    assert sorted(float(r[0]) for r in rows[1:]) == sorted({t["strength"] for t in trials})
    assert (tmp_path / "search" / "crazing_fid_vs_strength.png").stat().st_size > 0

    runs = mlflow.search_runs(experiment_names=["stablesdg"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "search-crazing")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(trials)
    assert all({"strength", "guidance_scale", "steps"} <= set(c.data.params) and "fid_surface" in c.data.metrics
               and "novelty" in c.data.metrics for c in children)
    assert parent.data.metrics["best_fid_surface"] == pytest.approx(best["fid_surface"])


def test_evaluate_writes_the_exact_metrics_shape(world, mlflow_store, tmp_path):
    root, params = world["root"], world["params"]
    for cls in CLASSES:
        generate_class(params, cls, world["processed"], root / "adapters" / cls, tmp_path / "synthetic" / cls,
                       tmp_path / "no-search" / f"{cls}.json")
    invoke(evaluate_command, ["--params", world["params_file"], "--processed", world["processed"], "--synthetic",
                              tmp_path / "synthetic", "--metrics",
                              tmp_path / "metrics" / "fid.json", "--report", tmp_path / "report.json",
                              "--grids", tmp_path / "grids"])
    result = json.loads((tmp_path / "report.json").read_text())
    assert list(result) == ["feature_net", "per_class", "mean"] and result["feature_net"] == "surface"
    assert list(result["per_class"]) == CLASSES
    for rec in result["per_class"].values():
        assert set(rec) == {"fid_surface", "kid_surface_mean", "kid_surface_std", "novelty", "nearest_train_ssim",
                            "detail_ratio", "n_real", "n_synthetic"}
        assert rec["n_real"] == 3 and rec["n_synthetic"] == 4 and math.isfinite(rec["fid_surface"])
        assert rec["novelty"] > 0 and -1 <= rec["nearest_train_ssim"] < 0.99, "generated, not copied"
        assert rec["detail_ratio"] > 0
    assert set(result["mean"]) == {"fid_surface", "kid_surface_mean", "novelty", "nearest_train_ssim", "detail_ratio"}
    fids = [r["fid_surface"] for r in result["per_class"].values()]
    assert result["mean"]["fid_surface"] == pytest.approx(sum(fids) / len(fids))
    # the DVC metric: the means only, under keys that do not depend on the feature net
    declared = json.loads((tmp_path / "metrics" / "fid.json").read_text())
    assert list(declared) == ["fid", "kid", "novelty"]
    assert declared["fid"] == pytest.approx(result["mean"]["fid_surface"], abs=1e-4)
    assert declared["kid"] == pytest.approx(result["mean"]["kid_surface_mean"], abs=1e-4)
    assert all((tmp_path / "grids" / f"{cls}.png").exists() for cls in CLASSES)
    run = mlflow.search_runs(experiment_names=["stablesdg"], output_format="list")[0]
    assert "grids" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_ablation_scores_every_variant(world, mlflow_store, tmp_path):
    output = invoke(ablation_command, ["--params", world["params_file"], "--processed", world["processed"],
                                       "--classes", "crazing", "--images", 3, "--adapt-steps", 2, "--steps", 4,
                                       "--search", tmp_path / "none",
                                       "--out", tmp_path / "reports"])
    result = json.loads((tmp_path / "reports" / "ablation.json").read_text())
    assert [r["id"] for r in result["rows"]] == [v.id for v in VARIANTS]
    assert all(math.isfinite(r["crazing"]) and r["mean"] == r["crazing"] for r in result["rows"])
    assert result["adapt_steps"] == {"embedding": 2, "lora": 2}
    table = (tmp_path / "reports" / "ablation.md").read_text()
    assert "| variant | crazing | mean |" in table and all(v.label in table for v in VARIANTS)
    assert "fid_surface" in output


def test_refinement_halves_the_grid_spacing_and_keeps_guidance_at_least_one():
    cfg = SearchConfig(strength=[0.3, 0.5, 0.7], guidance_scale=[3.0, 7.5], steps=[10])
    best = Trial(0.5, 3.0, 10)
    trials = refine_trials(cfg, best, {best}, 1)
    assert trials == [Trial(0.4, 3.0, 10), Trial(0.6, 3.0, 10), Trial(0.5, 5.25, 10)]  # 3.0 - 2.25 < 1: dropped
    assert refine_trials(cfg, Trial(0.7, 7.5, 10), set(), 2) == [
        Trial(0.65, 7.5, 10), Trial(0.75, 7.5, 10), Trial(0.7, 6.375, 10), Trial(0.7, 8.625, 10)]


def test_the_sampler_is_a_search_axis_and_refinement_keeps_it():
    cfg = SearchConfig(strength=[0.3, 0.7], guidance_scale=[3.0], steps=[10, 25], scheduler=["ddim", "ddpm"])
    grid = grid_trials(cfg)
    assert len(grid) == 8 and {t.scheduler for t in grid} == {"ddim", "ddpm"}
    assert {t.scheduler for t in refine_trials(cfg, Trial(0.7, 3.0, 25, "ddpm"), set(grid), 1)} == {"ddpm"}
    with pytest.raises(ConfigError, match=r"search.scheduler.*'heun'.*allowed values"):
        parse_params({"search": {"scheduler": ["ddim", "heun"]}})


def test_a_blurred_trial_cannot_win(world):
    import dataclasses

    from stablesdg.metrics import load_scorer

    params = world["params"]
    strict = dataclasses.replace(params, search=dataclasses.replace(params.search, min_detail_ratio=0.8))
    run = SearchRun(strict, "crazing", None, [], [], load_scorer(params.metrics, params.seed))
    sharp = {"strength": 0.7, "fid_surface": 9.0, "novelty": 0.9, "detail_ratio": 0.85}
    blurred = {"strength": 0.5, "fid_surface": 5.0, "novelty": 0.9, "detail_ratio": 0.4}
    copy = {"strength": 0.1, "fid_surface": 1.0, "novelty": 0.1, "detail_ratio": 1.0}
    assert run.best([blurred, sharp, copy]) is sharp
    # nothing eligible: the novel trial with detail closest to real, never the copy, nor the prior's noise
    assert run.best([blurred, copy, {**sharp, "detail_ratio": 0.6}])["strength"] == 0.7
    noise = {"strength": 1.0, "fid_surface": 144.0, "novelty": 4.5, "detail_ratio": 11.2}
    assert run.best([blurred, noise, copy, {**sharp, "detail_ratio": 0.6}])["strength"] == 0.7
    assert not run.eligible(noise) and run.eligible({**sharp, "detail_ratio": 1.2}), "the band is 0.8x-1.25x"
    off = SearchRun(params, "crazing", None, [], [], run.scorer)
    assert off.best([blurred, sharp, copy]) is blurred, "min_detail_ratio 0 leaves the FID choice"


def test_search_over_samplers_on_the_tiny_model(world):
    import dataclasses

    from stablesdg.data import heldout_paths, split_paths
    from stablesdg.generation import load_adapted_pipeline
    from stablesdg.metrics import load_scorer

    params, processed = world["params"], world["processed"]
    params = dataclasses.replace(params, search=dataclasses.replace(
        params.search, strength=[0.8], scheduler=["ddim", "euler_ancestral"], refine=False))
    pipe = load_adapted_pipeline(params.model, "crazing", world["root"] / "adapters" / "crazing")
    run = SearchRun(params, "crazing", pipe, split_paths(processed, "crazing", "train"),
                    heldout_paths(processed, "crazing"), load_scorer(params.metrics, params.seed))
    trials = run.run()
    assert [t["scheduler"] for t in trials] == ["ddim", "euler_ancestral"]
    assert trials[0]["fid_surface"] != trials[1]["fid_surface"], "the sampler changes the images"
    assert all(t["detail_ratio"] > 0 for t in trials)
