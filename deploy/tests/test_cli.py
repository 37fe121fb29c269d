"""`stablesdg-line classify` and `info` through the real argument parser and, once, the console script."""

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from corpus import BLUE, GREEN, RED, image_bytes
from onnx_models import RGB, write_model
from processes import run_cli

from stablesdg_line import sha256_hex
from stablesdg_line.cli import EXIT_MODEL_REFUSED, EXIT_SOME_FILES_FAILED, main
from stablesdg_line.contract import PROVENANCE_KEYS


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a_red.png").write_bytes(image_bytes(RED))
    (root / "b_broken.png").write_bytes(b"broken")
    (root / "readme.txt").write_text("not an image, skipped when expanding folders")
    (root / "sub" / "c_blue.jpg").write_bytes(image_bytes(BLUE, "JPEG"))
    return root


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classify_recursive_jsonl(rgb_model, tmp_path):
    tree = make_tree(tmp_path / "images")
    out = tmp_path / "out.jsonl"
    code = main(["classify", str(rgb_model), str(tree), "--recursive", "--output", str(out),
                 "--batch-size", "2"])
    rows = read_jsonl(out)
    assert code == EXIT_SOME_FILES_FAILED  # the broken file is reported, the others are classified
    assert [r["file"].split("/")[-1] for r in rows] == ["a_red.png", "b_broken.png", "c_blue.jpg"]
    assert [r["class"] for r in rows] == ["red_defect", None, "blue_defect"]
    assert rows[1]["error"].startswith("not a recognised image format (allowed by content: png, jpeg")
    assert set(rows[0]) == {"file", "class", "confidence", "scores", "latency_ms", "model_version", "error"}
    assert rows[0]["model_version"] == "7" and rows[0]["scores"]["red_defect"] == rows[0]["confidence"]


def test_classify_non_recursive_csv_of_good_files_exits_zero(rgb_model, tmp_path, capsys):
    tree = make_tree(tmp_path / "images")
    (tree / "b_broken.png").unlink()
    green = tmp_path / "green.png"
    green.write_bytes(image_bytes(GREEN))
    assert main(["classify", str(rgb_model), str(tree), str(green), "--format", "csv", "--threads", "1"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [(r["file"].split("/")[-1], r["class"]) for r in rows] == [("a_red.png", "red_defect"),
                                                                      ("green.png", "green_defect")]
    assert json.loads(rows[1]["scores"])["green_defect"] == float(rows[1]["confidence"])
    assert rows[0]["error"] == ""


def test_classify_refuses_tampered_model(rgb_model, tmp_path, capsys):
    pinned = sha256_hex(rgb_model.read_bytes())
    other = tmp_path / "other.onnx"
    shutil.copy(rgb_model, other)
    with other.open("ab") as handle:
        handle.write(b"\x00")
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(RED))
    assert main(["classify", str(other), str(image), "--expected-sha256", pinned]) == EXIT_MODEL_REFUSED
    assert "refusing model" in capsys.readouterr().err


def test_missing_metadata_key_is_reported(tmp_path, capsys):
    model = write_model(replace(RGB, drop_keys=("mean",)), tmp_path / "m.onnx")
    assert main(["info", str(model)]) == EXIT_MODEL_REFUSED
    assert "missing the required key 'mean'" in capsys.readouterr().err


def test_info_json_in_a_subprocess_without_torch(rgb_model):
    pin = sha256_hex(rgb_model.read_bytes())
    result = run_cli("info", str(rgb_model), "--json", "--expected-sha256", pin)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["class_names"] == ["red_defect", "green_defect", "blue_defect"]
    assert info["model_version"] == "7" and info["metadata"]["channel_mode"] == "RGB"
    assert info["sha256"] == sha256_hex(rgb_model.read_bytes())
    # a model exported before provenance existed still loads: every new provenance field reads "unknown"
    # (data_hash is also one of the older descriptive keys, which this test model carries)
    assert set(info["provenance"]) == set(PROVENANCE_KEYS) and info["provenance"]["data_hash"] == "abc123"
    assert {v for k, v in info["provenance"].items() if k != "data_hash"} == {"unknown"}


PROVENANCE = {"git_commit": "1f" * 20, "git_dirty": "true", "synthetic_hash": "dvc-md5:5e5e.dir",
              "adapter_sha256": json.dumps({"crazing": {"lora.safetensors": "ad" * 32}}),
              "mean_fid": "38.4215",
              "gain_macro_f1_mean": "+0.041200", "gain_macro_f1_std": "0.012000", "gain_repeats": "3",
              "int8_decision": "rejected", "int8_reason": "drop 1.20 points > 0.5", "mlflow_run_id": "abc"}


def test_info_shows_the_provenance_the_exporter_wrote(tmp_path, capsys):
    model = write_model(replace(RGB, metadata_overrides=PROVENANCE), tmp_path / "m.onnx")
    assert main(["info", str(model), "--json"]) == 0
    provenance = json.loads(capsys.readouterr().out)["provenance"]
    assert {k: provenance[k] for k in PROVENANCE} == PROVENANCE
    assert provenance["test_set_sha256"] == "unknown"  # absent keys are named, not dropped

    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert "1f" * 20 + " (tree was dirty)" in lines["git commit"]
    assert "+0.041200 +/- 0.012000 over 3 seed(s)" in lines["gain macro-F1"]
    assert "mean FID 38.4215" in lines["synthetic set"] and "dvc-md5:5e5e.dir" in lines["synthetic"]
    assert "crazing " + "ad" * 6 in lines["adapters"]
    assert lines["int8 gate"].endswith("rejected: drop 1.20 points > 0.5")


def test_console_script_is_installed():
    script = shutil.which("stablesdg-line", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "stablesdg-line 0.1.0" in result.stdout
