"""Stage `generate@<class>`: the command writes the class's synthetic images and their manifest, with the settings
it took (here: no search result, so the `generate` params), and the same seed gives the same bytes."""

from __future__ import annotations

import json

from conftest import invoke

from stablesdg.stages.generate import generate_command


def run_generate(world, out, search_dir) -> str:
    return invoke(generate_command, ["--class", "crazing", "--params", world["params_file"], "--processed",
                                     world["processed"], "--adapters", world["root"] / "adapters",
                                     "--search", search_dir, "--out", out])


def test_generate_writes_the_images_and_their_manifest(tiny_world, tmp_path):
    output = run_generate(tiny_world, tmp_path / "a", tmp_path / "no-search")
    images = sorted((tmp_path / "a" / "crazing").glob("*.png"))
    assert len(images) == tiny_world["params"].generate.per_class == 4
    manifest = json.loads((tmp_path / "a" / "crazing" / "manifest.json").read_text())
    assert manifest["settings"]["strength"] == 0.6 and manifest["settings"]["steps"] == 4
    assert "generate crazing: 4 images" in output
    run_generate(tiny_world, tmp_path / "b", tmp_path / "no-search")
    assert [p.read_bytes() for p in images] == \
        [p.read_bytes() for p in sorted((tmp_path / "b" / "crazing").glob("*.png"))]


def test_generate_follows_the_search_result(tiny_world, tmp_path):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    best = {"strength": 0.8, "guidance_scale": 3.0, "steps": 4, "scheduler": "ddim"}
    (search_dir / "crazing.json").write_text(json.dumps({"best": best}))
    run_generate(tiny_world, tmp_path / "out", search_dir)
    manifest = json.loads((tmp_path / "out" / "crazing" / "manifest.json").read_text())
    assert manifest["settings"]["strength"] == 0.8, manifest
