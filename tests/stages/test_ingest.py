"""Stage `ingest`: `stablesdg data ingest` writes the processed folder, the quarantine report, the split summary,
the contact sheet and the two data metrics; a bad file is quarantined, the rest goes on."""

from __future__ import annotations

import json

import yaml
from conftest import invoke
from PIL import Image

from stablesdg.cli import main
from stablesdg.demo import write_demo_dataset
from stablesdg.stages.ingest import ingest_command

CLASSES = ["crazing", "scratches"]


def test_ingest_writes_its_declared_outputs_and_quarantines_a_bad_file(tmp_path, mlflow_store):
    write_demo_dataset(tmp_path / "source", CLASSES, 6, 32, 0)
    (tmp_path / "source" / "crazing" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": str(tmp_path / "source"), "image_size": 32, "k_shot": 2, "val_per_class": 1,
                 "test_per_class": 3},
        "classes": {c: {"initializer": "line"} for c in CLASSES}}))
    output = invoke(ingest_command, ["--params", tmp_path / "params.yaml", "--out", tmp_path / "processed",
                                     "--reports", tmp_path / "reports", "--metrics", tmp_path / "data.json"])
    assert "12 images" in output and "1 quarantined" in output
    assert json.loads((tmp_path / "data.json").read_text()) == {"images": 12, "quarantined": 1}
    quarantine = json.loads((tmp_path / "reports" / "quarantine.json").read_text())
    assert quarantine["count"] == 1 and "broken.png" in json.dumps(quarantine["files"])
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert "rejected" not in summary and summary["images"] == 12
    assert (tmp_path / "processed" / "manifest.csv").exists()
    assert sorted(p.name for p in (tmp_path / "processed" / "splits").iterdir()) == [f"{c}.json" for c in CLASSES]
    assert Image.open(tmp_path / "reports" / "contact_sheet.png").size[0] > 32
    assert (tmp_path / "source" / "crazing" / "broken.png").read_bytes() == b"not an image", "source untouched"
    assert main.get_command(None, "data").get_command(None, "ingest") is not None


def test_ingest_of_a_missing_source_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "nowhere")}}))
    result = CliRunner().invoke(ingest_command, ["--params", str(tmp_path / "params.yaml"),
                                                 "--out", str(tmp_path / "processed")])
    assert result.exit_code == 1 and "data.source" in result.output and "Traceback" not in result.output
