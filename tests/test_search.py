"""The search library (stablesdg.search): trial grids, refinement and the choice of the best trial, on the tiny
SD model's adapters (tests/stages/test_search.py runs the stage)."""

from __future__ import annotations

import pytest

from stablesdg.config import ConfigError, SearchConfig, parse_params
from stablesdg.search import SearchRun, Trial, grid_trials, refine_trials


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


def test_a_blurred_trial_cannot_win(tiny_world):
    import dataclasses

    from stablesdg.metrics import load_scorer

    params = tiny_world["params"]
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


def test_search_over_samplers_on_the_tiny_model(tiny_world):
    import dataclasses

    from stablesdg.data import heldout_paths, split_paths
    from stablesdg.generation import load_adapted_pipeline
    from stablesdg.metrics import load_scorer

    params, processed = tiny_world["params"], tiny_world["processed"]
    params = dataclasses.replace(params, search=dataclasses.replace(
        params.search, strength=[0.8], scheduler=["ddim", "euler_ancestral"], refine=False))
    pipe = load_adapted_pipeline(params.model, "crazing", tiny_world["root"] / "adapters" / "crazing")
    run = SearchRun(params, "crazing", pipe, split_paths(processed, "crazing", "train"),
                    heldout_paths(processed, "crazing"), load_scorer(params.metrics, params.seed))
    trials = run.run()
    assert [t["scheduler"] for t in trials] == ["ddim", "euler_ancestral"]
    assert trials[0]["fid_surface"] != trials[1]["fid_surface"], "the sampler changes the images"
    assert all(t["detail_ratio"] > 0 for t in trials)
