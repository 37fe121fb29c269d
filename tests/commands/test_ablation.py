"""`stablesdg ablation`: every variant scored, the JSON and the markdown table written."""

from __future__ import annotations

import json
import math

from conftest import invoke

from stablesdg.commands.ablation import VARIANTS, ablation_command


def test_ablation_scores_every_variant(tiny_world, mlflow_store, tmp_path):
    output = invoke(ablation_command, ["--params", tiny_world["params_file"], "--processed", tiny_world["processed"],
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
