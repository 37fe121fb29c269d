"""Stage `check-base`: the command on a small SD 1.5-layout folder (built by the real builder) names a missing file
and stops the adapt stage with the same words, and its report is stable and follows the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner
from conftest import MINI_CLASSES

from stablesdg.stages.adapt import adapt_command
from stablesdg.stages.check_base import check_base_command


def write_params(path: Path, folder: Path, classes: dict | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"classes": classes or MINI_CLASSES, "model": {"base": str(folder), "resolution": 64},
                                    "adapt": {"device": "cpu"}}))
    return path


def test_check_base_names_a_missing_file_and_the_stage_stops_with_it(mini_folder, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(mini_folder, broken)
    (broken / "text_encoder" / "model.safetensors").unlink()
    result = CliRunner().invoke(check_base_command, ["--params", str(write_params(tmp_path / "p.yaml", broken))])
    assert result.exit_code == 1
    assert "MISSING  text_encoder/model.safetensors" in result.output
    assert f"{broken / 'text_encoder' / 'model.safetensors'}: missing" in result.output
    stage = CliRunner().invoke(adapt_command, ["--class", "crazing", "--params", str(tmp_path / "p.yaml"),
                                               "--processed", str(tmp_path / "none")])
    assert stage.exit_code == 1 and f"{broken / 'text_encoder' / 'model.safetensors'}: missing" in stage.output


def test_check_base_stage_output_is_stable_and_follows_the_weights(mini_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(mini_folder, folder)
    params = str(write_params(tmp_path / "p.yaml", folder))
    outs = []
    for _ in range(2):
        result = CliRunner().invoke(check_base_command, ["--params", params, "--out", str(tmp_path / "base.json")])
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / "base.json").read_bytes())
    assert outs[0] == outs[1]  # DVC re-runs nothing downstream when the model did not change
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    CliRunner().invoke(check_base_command, ["--params", params, "--out", str(tmp_path / "base.json")])
    assert (tmp_path / "base.json").read_bytes() != outs[0]
