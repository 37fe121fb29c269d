"""`stablesdg recognition`: scratch and surface-pretrained backbones, each arm trained per seed; the gains are
paired by seed and the table names every arm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import THREE_CLASSES, make_processed

from stablesdg.commands.recognition import ARMS, recognition_command
from stablesdg.demo import write_demo_dataset


def test_recognition_pairs_gains_by_seed(surface_backbone, tmp_path, mlflow_store):
    _, _, weights = surface_backbone
    processed = make_processed(tmp_path, THREE_CLASSES, per_class=10, size=48, k_shot=4)
    write_demo_dataset(tmp_path / "syn_raw", THREE_CLASSES, 4, 48, seed=77)
    for cls in THREE_CLASSES:
        (tmp_path / "synthetic" / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((tmp_path / "syn_raw" / cls).iterdir())):
            (tmp_path / "synthetic" / cls / f"{i}.png").write_bytes(src.read_bytes())
    raw = {"seed": 1, "classes": {c: {"initializer": "line"} for c in THREE_CLASSES},
           "classifier": {"backbone": "mobilenet_v3_small", "input_size": 32, "epochs": 1, "batch_size": 8,
                          "patience": 1, "repeats": 1, "synthetic_use": "append"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(recognition_command, [
        "--params", str(tmp_path / "params.yaml"), "--processed", str(processed), "--synthetic",
        str(tmp_path / "synthetic"), "--seeds", "2", "--weights", str(weights), "--out", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "rec" / "recognition.json").read_text())
    assert rec["seeds"] == [1, 2] and set(rec["inits"]) == {"scratch", "surface_pretrained"}
    assert rec["n_train_real"] == 12 and rec["n_train_synthetic"] == 12 and rec["n_test"] == 12
    for per_init in rec["inits"].values():
        assert all(len(per_init[arm]["macro_f1"]["values"]) == 2 for arm, *_ in ARMS)
        paired = np.subtract(per_init["real_synthetic"]["macro_f1"]["values"], per_init["real"]["macro_f1"]["values"])
        np.testing.assert_allclose(per_init["gain_macro_f1"]["values"], paired, atol=2e-6)
        assert per_init["gain_macro_f1"]["mean"] == pytest.approx(paired.mean(), abs=2e-6)
        equal = np.subtract(per_init["real_synthetic"]["macro_f1"]["values"],
                            per_init["real_equal_steps"]["macro_f1"]["values"])
        np.testing.assert_allclose(per_init["gain_equal_steps_macro_f1"]["values"], equal, atol=2e-6)
    table = (tmp_path / "rec" / "recognition.md").read_text()
    assert "| scratch |" in table and "| surface_pretrained |" in table and all(label in table for _, label, *_ in ARMS)
