"""Stage `search@<class>`: the command on the tiny model's adapters writes every trial, the best one, the plot's
CSV and PNG, and one MLflow child run per trial."""

from __future__ import annotations

import csv
import json
import math

import mlflow
import pytest
from conftest import invoke

from stablesdg.stages.search import search_command


def test_search_writes_every_trial_the_best_and_the_plot(tiny_world, mlflow_store, tmp_path):
    root = tiny_world["root"]
    invoke(search_command, ["--class", "crazing", "--params", tiny_world["params_file"], "--processed",
                            tiny_world["processed"], "--adapters", root / "adapters", "--out", tmp_path / "search"])
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
