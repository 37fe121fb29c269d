"""The DVC-declared metrics stay readable: a few short figures per file, and `dvc exp show --only-changed` on
two experiments fits 120 columns. Real DVC in a temporary repo; the metrics files are written by the
project's own functions (`train_metrics`, `fid_metrics`, `export_metrics`, `data_metrics`) from full reports
shaped like the real ones (six classes, three seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, run_cli

from stablesdg.data import data_metrics
from stablesdg.stages.evaluate import fid_metrics
from stablesdg.stages.export import export_metrics
from stablesdg.stages.train import champion_param, train_metrics

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
MAX_WIDTH = 120


def _evaluation(rng: np.random.Generator) -> dict:
    return {"accuracy": rng.uniform(0.6, 0.95), "macro_f1": rng.uniform(0.6, 0.95),
            "per_class": {c: {"precision": rng.uniform(), "recall": rng.uniform()} for c in CLASSES},
            "confusion_matrix": rng.integers(0, 20, (6, 6)).tolist(), "run_id": rng.bytes(16).hex(),
            "test_set_sha256": rng.bytes(32).hex(), "n_train_real": 60, "n_train_synthetic": 120}


def reports(seed: int, version: int) -> dict[str, dict]:
    """Full train / evaluate / export / ingest reports, as the stages write them to reports/."""
    rng = np.random.default_rng(seed)
    real, augmented = _evaluation(rng), _evaluation(rng)
    gains = rng.normal(0.03, 0.02, 3)
    train = {"primary_metric": "macro_f1", "real_only": real, "real_plus_synthetic": augmented,
             "gain": {"accuracy": augmented["accuracy"] - real["accuracy"],
                      "macro_f1": augmented["macro_f1"] - real["macro_f1"]},
             "repeats": {"seeds": [42, 43, 44], "gain_macro_f1": gains.tolist(),
                         "gain_macro_f1_mean": float(gains.mean()), "gain_macro_f1_std": float(gains.std(ddof=1))},
             "registered": {"version": str(version), "alias": "champion", "run_id": rng.bytes(16).hex()}}
    per_class = {c: {"fid_surface": rng.uniform(5, 130), "kid_surface_mean": rng.uniform(0, 40),
                     "kid_surface_std": rng.uniform(), "novelty": rng.uniform(0.5, 1.5),
                     "nearest_train_ssim": rng.uniform(), "n_real": 20, "n_synthetic": 40} for c in CLASSES}
    fid = {"feature_net": "surface", "per_class": per_class,
           "mean": {k: float(np.mean([v[k] for v in per_class.values()]))
                    for k in ("fid_surface", "kid_surface_mean", "novelty", "nearest_train_ssim")}}
    kept = version % 2 == 0  # the experiments disagree on int8: its column is shown
    export = {"model_version": str(version), "fp32": {"sha256": rng.bytes(32).hex(), "test_accuracy": 0.775,
                                                      "latency_ms": rng.uniform(2, 12), "parity": {"n_images": 120}},
              "int8": {"decision": "kept" if kept else "rejected", "int8_accuracy": 0.8, "latency_ms": 1.2}}
    data = {"layout": "folders", "source": "data/NEU-DET", "images": 1800, "quarantined": 3,
            "per_class": {c: {"train": 10, "val": 10, "test": 20} for c in CLASSES}}
    return {"train": train, "fid": fid, "export": export, "data": data}


def declared(full: dict[str, dict]) -> dict[str, dict]:
    """The four files dvc.yaml declares as metrics, from the full reports."""
    return {"metrics/train.json": train_metrics(full["train"]), "metrics/fid.json": fid_metrics(full["fid"]),
            "metrics/export.json": export_metrics(full["export"]), "metrics/data.json": data_metrics(full["data"])}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[prefix + k] = v
    return out


def test_declared_metrics_are_a_few_short_figures():
    files = declared(reports(0, 1))
    keys = [k for f in files.values() for k in _flat(f)]
    assert sorted(keys) == sorted(["acc", "f1", "gain", "gain_sd", "fid", "kid", "novelty", "int8", "ms", "images",
                                   "quarantined"])
    assert files["metrics/train.json"]["gain_sd"] > 0 and files["metrics/export.json"]["int8"] in ("kept", "rejected")
    # the control: the full reports, which dvc.yaml used to declare, flatten to ~90 columns
    assert len([k for r in reports(0, 1).values() for k in _flat(r)]) > 80


def test_project_declares_only_these_files_and_export_follows_train_by_a_param():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    metrics = sorted(next(iter(m)) if isinstance(m, dict) else m
                     for s in stages.values() for m in s.get("do", s).get("metrics", []))
    assert metrics == sorted(declared(reports(0, 1)))
    train_outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages["train"]["outs"] + stages["train"]["metrics"]}
    assert not train_outs & set(stages["export"]["deps"])  # a file dependency would be an md5 column
    assert {"reports/train/champion.json": ["champion"]} in stages["export"]["params"]


STAGE = """
import json, os, sys, yaml
epochs = yaml.safe_load(open("params.yaml"))["classifier"]["epochs"]
files = json.load(open(f"variants/{epochs}.json"))
wanted = ["metrics/export.json"] if sys.argv[1] == "export" else [f for f in files if f != "metrics/export.json"]
for path in wanted:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(files[path], open(path, "w"), indent=2)
"""

DVC_YAML = {"stages": {
    "train": {"cmd": "python stage.py train", "deps": ["stage.py", "variants"], "params": ["classifier.epochs"],
              "outs": [{"reports/train/champion.json": {"cache": False}}],
              "metrics": [{f"metrics/{n}.json": {"cache": False}} for n in ("data", "fid", "train")]},
    "export": {"cmd": "python stage.py export", "deps": ["stage.py"],
               "params": [{"reports/train/champion.json": ["champion"]}],
               "metrics": [{"metrics/export.json": {"cache": False}}]},
}}


@pytest.fixture
def dvc_repo(tmp_path):
    """A git + DVC repo whose two stages copy prepared metrics per `classifier.epochs` (12 is the baseline)."""
    fid, data = reports(0, 1)["fid"], reports(0, 1)["data"]  # a classifier experiment leaves these alone
    (tmp_path / "variants").mkdir()
    for version, epochs in enumerate((12, 20, 30), start=1):
        full = {**reports(epochs, version), "fid": fid, "data": data}
        files = {**declared(full), "reports/train/champion.json": champion_param(full["train"])}
        (tmp_path / "variants" / f"{epochs}.json").write_text(json.dumps(files))
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"classifier": {"epochs": 12}}))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        run_cli(cmd, tmp_path)
    return tmp_path


def test_dvc_exp_show_of_two_experiments_fits_120_columns(dvc_repo):
    for epochs in (20, 30):
        run_cli(["dvc", "exp", "run", "-q", "--set-param", f"classifier.epochs={epochs}"], dvc_repo)
    # COLUMNS: a terminal wide enough that DVC shows every column instead of eliding them.
    shown = run_cli(["dvc", "exp", "show", "--only-changed", "--no-pager"], dvc_repo,
                    {"COLUMNS": "400", "DVC_NO_ANALYTICS": "1"}).stdout
    lines = [line.rstrip() for line in shown.splitlines() if line.strip()]
    header = next(line for line in lines if "Experiment" in line).split()
    assert {"acc", "f1", "gain", "gain_sd", "int8", "ms", "classifier.epochs", "champion"} <= set(header)
    assert len([line for line in lines if "[" in line]) == 2  # the two experiments are rows
    widest = max(len(line) for line in lines)
    assert widest <= MAX_WIDTH, f"dvc exp show is {widest} columns wide:\n{shown}"


def test_dvc_metrics_show_fits_120_columns(dvc_repo):
    """One row per file, one column per key: every key of every file makes the table wider."""
    shown = run_cli(["dvc", "metrics", "show"], dvc_repo, {"COLUMNS": "400", "DVC_NO_ANALYTICS": "1"}).stdout
    lines = [line.rstrip() for line in shown.splitlines() if line.strip()]
    assert len(lines) == 5 and "metrics/train.json" in shown  # header + the four files
    widest = max(len(line) for line in lines)
    assert widest <= MAX_WIDTH, f"dvc metrics show is {widest} columns wide:\n{shown}"
