"""`stablesdg base build-random`: a real-size SD folder with random weights (slow: SD 1.5's 1.1 B parameters on
CPU, about 1.7 GB written), and an architecture it does not know refused before anything is written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import invoke

from stablesdg.commands.base import base_group


def test_an_unknown_architecture_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(base_group, ["build-random", "--arch", "sdxl", "--out", str(tmp_path / "sd")])
    assert result.exit_code == 2 and "'sdxl' is not one of 'sd15', 'sd21'" in result.output
    assert not (tmp_path / "sd").exists()


@pytest.mark.slow
def test_build_random_writes_a_folder_stock_diffusers_reads(tmp_path):
    from diffusers import UNet2DConditionModel

    output = invoke(base_group, ["build-random", "--arch", "sd15", "--out", tmp_path / "sd", "--seed", 3])
    assert f"-> {tmp_path / 'sd'} (set model.base: {tmp_path / 'sd'}, model.resolution: 512" in output
    info = json.loads((tmp_path / "sd" / "stablesdg_random.json").read_text())
    assert (info["arch"], info["seed"], info["dtype"]) == ("sd15", 3, "float16")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "safety_checker" in index
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964 and unet.config.cross_attention_dim == 768
