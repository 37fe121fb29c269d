"""Stage `demo`: `stablesdg data demo` writes the six procedural classes, the same bytes for the same seed."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from stablesdg.cli import main
from stablesdg.demo import TEXTURES
from stablesdg.stages.demo import demo_command
from stablesdg.utils import sha256_tree


def run_demo(tmp_path, out: str, seed: int = 42) -> str:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"demo": {"per_class": 5, "size": 32}}}))
    result = CliRunner().invoke(demo_command, ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_writes_every_class_and_the_same_bytes_again(tmp_path):
    assert "demo: wrote 30 images" in run_demo(tmp_path, "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(TEXTURES)
    (tmp_path / "a" / "crazing" / "stale.png").write_bytes(b"old")  # a previous run's leftovers are removed
    run_demo(tmp_path, "a")
    run_demo(tmp_path, "b")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    run_demo(tmp_path, "c", seed=7)
    assert sha256_tree(tmp_path / "c") != sha256_tree(tmp_path / "a")


def test_demo_stage_does_not_stand_in_the_way_of_your_own_classes(tmp_path):
    """Own data with seven own classes: the demo stage still writes its six classes and exits 0."""
    own = {f"defect-{i}": {} for i in range(7)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "mine", "demo": {"per_class": 5,
                                                                                                "size": 32}},
                                                          "classes": own}))
    result = CliRunner().invoke(main, ["data", "demo", "--params", str(tmp_path / "params.yaml"),
                                       "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(TEXTURES)
    assert len(list((tmp_path / "demo" / "crazing").glob("*.png"))) == 5
