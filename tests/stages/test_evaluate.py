"""Stage `evaluate`: FID/KID, novelty, nearest-train SSIM and detail per class, the declared means and the grids,
from images the tiny model generated."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
from conftest import TINY_CLASSES, invoke

from stablesdg.generation import generate_class
from stablesdg.stages.evaluate import evaluate_command


def test_evaluate_writes_the_exact_metrics_shape(tiny_world, mlflow_store, tmp_path):
    root, params = tiny_world["root"], tiny_world["params"]
    for cls in TINY_CLASSES:
        generate_class(params, cls, tiny_world["processed"], root / "adapters" / cls, tmp_path / "synthetic" / cls,
                       tmp_path / "no-search" / f"{cls}.json")
    invoke(evaluate_command, ["--params", tiny_world["params_file"], "--processed", tiny_world["processed"], "--synthetic",
                              tmp_path / "synthetic", "--metrics",
                              tmp_path / "metrics" / "fid.json", "--report", tmp_path / "report.json",
                              "--grids", tmp_path / "grids"])
    result = json.loads((tmp_path / "report.json").read_text())
    assert list(result) == ["feature_net", "per_class", "mean"] and result["feature_net"] == "surface"
    assert list(result["per_class"]) == TINY_CLASSES
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
    assert all((tmp_path / "grids" / f"{cls}.png").exists() for cls in TINY_CLASSES)
    run = mlflow.search_runs(experiment_names=["stablesdg"], output_format="list")[0]
    assert "grids" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
