"""Shared test fixtures: a real MLflow sqlite store per test, a processed-data fixture, a DVC project copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store; artifacts under the same tmp dir."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root (./mlruns) lands in tmp too
    # mlflow.set_tracking_uri is process-global: an earlier test's store must not leak into this one.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri


def run_cli(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console command with the venv's bin first on PATH (as `dvc repro` runs `stablesdg`)."""
    full_env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
                "DVC_NO_ANALYTICS": "1", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(dest: Path, params_yaml: str | None = None) -> Path:
    """A temporary git + DVC repo with this project's dvc.yaml, params.yaml and sources."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if params_yaml is not None:
        (dest / "params.yaml").write_text(params_yaml)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
    run_cli(["git", "init", "-q"], dest)
    run_cli(["git", "config", "user.email", "t@example.com"], dest)
    run_cli(["git", "config", "user.name", "test"], dest)
    run_cli(["dvc", "init", "-q"], dest, env)
    run_cli(["git", "add", "-A"], dest)
    run_cli(["git", "commit", "-qm", "init"], dest)
    return dest


def small_params(classes: list[str] | None = None, **sections: dict) -> str:
    """This repo's params.yaml with the smallest settings a whole `dvc repro` trains with (minutes on 2 cores),
    for `classes` only (default: all six); `sections` update top-level blocks (e.g. data={"source": ...})."""
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update({"image_size": 64, "k_shot": 4, "val_per_class": 4, "test_per_class": 6})
    raw["data"]["demo"] = {"per_class": 14, "size": 64}
    raw["model"]["resolution"] = 32
    raw["adapt"]["embedding"]["steps"] = 4
    raw["adapt"]["lora"]["steps"] = 4
    raw["adapt"]["checkpoint_every"] = 2
    raw["search"].update({"strength": [0.4, 0.7], "guidance_scale": [3.0], "steps": [4], "images_per_trial": 4,
                          "refine": False})
    raw["generate"].update({"per_class": 6, "steps": 4, "resolution": 48})
    raw["classifier"].update({"input_size": 64, "epochs": 3, "batch_size": 16, "repeats": 1})
    raw["export"]["calibration_images"] = 12
    if classes is not None:
        raw["classes"] = {c: raw["classes"][c] for c in classes}
    for key, values in sections.items():
        raw[key].update(values)
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: results do not depend on the core count, and two threads on a 2-core machine that
    is busy elsewhere (pytest plus a CLI subprocess) spin instead of working, 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _shared_model_cache(tmp_path_factory):
    """Built-in tiny models are built once per test session, not once per test."""
    os.environ.setdefault("STABLESDG_CACHE", str(tmp_path_factory.mktemp("stablesdg-cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_processed(root: Path, classes: list[str], per_class: int = 8, size: int = 64, k_shot: int = 3,
                   seed: int = 0) -> Path:
    """A real ingest of demo images into root/processed (the layout every stage reads)."""
    from stablesdg.config import DataConfig
    from stablesdg.data import ingest
    from stablesdg.demo import write_demo_dataset

    write_demo_dataset(root / "raw", classes, per_class, size, seed)
    cfg = DataConfig(image_size=size, k_shot=k_shot, val_per_class=2, test_per_class=per_class - k_shot - 2)
    ingest(root / "raw", root / "processed", cfg, classes, seed)
    return root / "processed"


def tiny_run_params(adapt_steps: int, checkpoint_every: int, generate: dict, **extra) -> dict:
    """Raw params for the tiny model on two 48 px classes (crazing, scratches): what the adaptation and search
    tests share; each adds its own generation settings and sections."""
    return {
        "seed": 3,
        "data": {"image_size": 48},
        "classes": {"crazing": {"initializer": "crack"}, "scratches": {"initializer": "line"}},
        "model": {"base": "tiny", "resolution": 32},
        "adapt": {"embedding": {"steps": adapt_steps, "batch_size": 2, "learning_rate": 0.05},
                  "lora": {"steps": adapt_steps, "batch_size": 2, "rank": 2, "alpha": 2.0},
                  "checkpoint_every": checkpoint_every},
        "generate": generate,
        **extra,
    }


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real shared registry for the session: PostgreSQL 15 + `mlflow server --app-name basic-auth`, with the
    plant's accounts (tests/registry_services.py)."""
    from registry_services import plant_registry

    with plant_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


def invoke(command, args: list) -> str:
    """Run a click command in-process (click's CliRunner); fails the test with the output on a non-zero exit."""
    from click.testing import CliRunner

    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


TINY_CLASSES = ["crazing", "scratches"]
TINY_RAW = tiny_run_params(
    4, 4, {"per_class": 4, "batch_size": 4, "steps": 4, "strength": 0.6},
    # strength 0.05 x 4 steps is no denoising step at all: the trial's images are the train images themselves
    search={"strength": [0.05, 0.8], "guidance_scale": [3.0], "steps": [4], "images_per_trial": 3,
            "refine": True, "refine_rounds": 1, "min_novelty": 0.5, "bootstrap": 5},
    metrics={"kid_subsets": 5},
)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Processed data, a params file and adapters trained for both tiny classes: built once, read by the search,
    generate, evaluate and ablation tests (nothing here changes the working directory or the environment)."""
    import yaml

    from stablesdg.adaptation import adapt_class
    from stablesdg.config import load_params

    root = tmp_path_factory.mktemp("tiny-world")
    processed = make_processed(root, TINY_CLASSES, per_class=8, size=48, k_shot=3)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({**TINY_RAW, "metrics": {**TINY_RAW["metrics"],
                                                                   "cache_dir": str(root / "cache")}}))
    params = load_params(params_file)
    for cls in TINY_CLASSES:
        adapt_class(params, cls, processed, root / "adapters", checkpoint_root=root / "ckpt")
    return {"root": root, "processed": processed, "params_file": params_file, "params": params}
