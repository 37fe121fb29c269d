"""Shared test fixtures: a real MLflow sqlite store per test, a processed-data fixture, a DVC project copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from stablesdg.classifier import ImageSet
    from stablesdg.config import Params

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


@pytest.fixture
def shared_version(registry, monkeypatch, tmp_path) -> str:
    """One version published to the shared registry (a stand-in file: the registry does not read it)."""
    from registry_services import publish

    model = tmp_path / "classifier.onnx"
    model.write_bytes(b"not really onnx, the registry does not care")
    return publish(registry, monkeypatch, model, 0.9, "a" * 40)


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


MINI_CLASSES = {"crazing": {"initializer": "crack"}, "scratches": {"initializer": "line"}}


def mini_arch():
    """SD 1.5's layout (model_index with a safety checker, CLIP's 49408-token BPE, PNDM) at a size that builds in
    a second: the builder's own code path, only the widths differ from ARCHS["sd15"]."""
    from dataclasses import replace

    from stablesdg.basemodels import ARCHS

    return replace(
        ARCHS["sd15"], name="mini", resolution=64,
        unet={**ARCHS["sd15"].unet, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
              "norm_num_groups": 16, "layers_per_block": 1, "sample_size": 8},
        vae={**ARCHS["sd15"].vae, "block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8, "sample_size": 64,
             "layers_per_block": 1},
        text={**ARCHS["sd15"].text, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32},
    )


@pytest.fixture(scope="session")
def mini_folder(tmp_path_factory) -> Path:
    """mini_arch() written by the real builder (random weights); tests that change it work on a copy."""
    from stablesdg.basemodels import build_random_base

    return build_random_base(mini_arch(), tmp_path_factory.mktemp("mini") / "sd", seed=1)


ADAPT_CLASSES = ["crazing", "scratches"]


def adapt_raw(**overrides) -> dict:
    """Raw params of the adaptation tests: 6 + 6 steps of the tiny model, a checkpoint every 2."""
    raw = tiny_run_params(6, 2, {"per_class": 5, "batch_size": 2, "steps": 4, "strength": 0.6, "use_search": False})
    for key, value in overrides.items():
        raw.setdefault(key, {}).update(value)
    return raw


def adapt_params(**overrides):
    from stablesdg.config import parse_params

    return parse_params(adapt_raw(**overrides))


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A real ingest of both ADAPT_CLASSES (8 demo images each, 48 px)."""
    return make_processed(tmp_path_factory.mktemp("data"), ADAPT_CLASSES, per_class=8, size=48)


def write_corpus(root, sources=("crazing", "patches", "scratches"), per_source=6, size=96):
    """A small image corpus: one sub-folder per source (demo textures stand in for real surfaces)."""
    from stablesdg.demo import demo_image

    for source in sources:
        (root / source).mkdir(parents=True, exist_ok=True)
        for i in range(per_source):
            demo_image(source, i, 11, size).save(root / source / f"{i}.png")
    return root


PRIOR_TINY = dict(resolution=32, vae_channels=(16, 32), latent_channels=4, unet_channels=(16, 32), text_hidden=32,
                  vae_steps=3, vae_crop=16, vae_batch_size=2, unet_steps=3, batch_size=2)


@pytest.fixture(scope="module")
def prior_corpus(tmp_path_factory):
    """Two sources of four 64 px demo images: the prior tests' corpus."""
    from stablesdg.demo import demo_image

    root = tmp_path_factory.mktemp("corpus")
    for source in ("crazing", "patches"):
        (root / source).mkdir()
        for i in range(4):
            demo_image(source, i, 5, 64).save(root / source / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_prior(prior_corpus, tmp_path_factory):
    """The prior pretrained on prior_corpus with PRIOR_TINY: (its folder, its record)."""
    from stablesdg.pretraining.prior import PriorRecipe, pretrain

    out = tmp_path_factory.mktemp("prior") / "prior"
    record = pretrain(PriorRecipe(**PRIOR_TINY), out, prior_corpus)
    return out, record


THREE_CLASSES = ["crazing", "patches", "scratches"]


@pytest.fixture(scope="module")
def surface_backbone(tmp_path_factory):
    """A mobilenet_v3_small body pretrained one epoch on three 6-image sources: (model, stats, weights file)."""
    from stablesdg.demo import demo_image
    from stablesdg.pretraining.backbone import BackbonePretrainConfig, pretrain_backbone, save_body_weights
    from stablesdg.pretraining.corpus import FolderCorpus

    root = tmp_path_factory.mktemp("backbone")
    for source in ("brodatz", "kolektorsdd", "aitex"):
        (root / "corpus" / source).mkdir(parents=True)
        for i in range(6):
            demo_image(THREE_CLASSES[len(source) % 3], i, 3, 64).save(root / "corpus" / source / f"{i}.png")
    corpus = FolderCorpus(root / "corpus", 32)
    cfg = BackbonePretrainConfig(backbone="mobilenet_v3_small", input_size=32, epochs=1, batch_size=8)
    model, stats = pretrain_backbone(corpus, cfg)
    path = save_body_weights(model, root / "mnv3_surface.safetensors", {"backbone": cfg.backbone})
    return model, stats, path


def classifier_params(**classifier) -> object:
    from stablesdg.config import parse_params

    # these synthetic folders are demo images without a generate manifest: appended, unless a test says replace
    cfg = {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 3, "batch_size": 8,
           "learning_rate": 0.003, "patience": 3, "repeats": 1, "synthetic_use": "append", **classifier}
    return parse_params({"seed": 5, "classes": {c: {"initializer": "line"} for c in THREE_CLASSES}, "classifier": cfg})


@pytest.fixture(scope="module")
def classifier_data(tmp_path_factory):
    """Real processed splits plus a synthetic folder (demo images of another seed stand in for generated ones)."""
    from stablesdg.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("clsdata")
    processed = make_processed(root, THREE_CLASSES, per_class=10, size=64, k_shot=4)
    write_demo_dataset(root / "synthetic_raw", THREE_CLASSES, 6, 64, seed=99)
    synthetic = root / "synthetic"
    for cls in THREE_CLASSES:
        (synthetic / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((root / "synthetic_raw" / cls).iterdir())):
            (synthetic / cls / f"{cls}_{i:05d}.png").write_bytes(src.read_bytes())
    return processed, synthetic


EXPORT_SIZE = 64


def export_raw_params(**export) -> dict:
    """Raw params of the export tests: mobilenet_v3_small at EXPORT_SIZE px, int8 on, 60 calibration images."""
    return {"seed": 3, "classes": {c: {"initializer": "line"} for c in THREE_CLASSES},
            "classifier": {"backbone": "mobilenet_v3_small", "input_size": EXPORT_SIZE},
            "export": {"opset": 17, "quantize": True, "calibration_images": 60, **export}}


def quick_model(train: ImageSet) -> nn.Module:
    """Random weights with BatchNorm statistics of the train images: input-dependent logits, no training.

    (A few SGD steps on 9 images collapse mobilenet_v3 to a constant output in eval mode.)
    """
    import torch
    from torch import nn

    from stablesdg.classifier import build_backbone

    torch.manual_seed(0)
    model = build_backbone("mobilenet_v3_small", len(THREE_CLASSES))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average over the one pass below
    with torch.no_grad():
        model.train()(train.x)
    return model.eval()


@dataclass
class Shipped:
    root: Path
    processed: Path
    params: Params
    model: nn.Module
    test: ImageSet
    summary: dict

    @property
    def onnx_path(self) -> Path:
        return self.root / "models" / "classifier.onnx"

    def torch_top1(self) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(self.test.x).argmax(1).numpy()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Train-lite a champion, register it like `stablesdg train` does, export it once (int8 always kept)."""
    import mlflow

    from stablesdg import tracking
    from stablesdg.classifier import load_images, make_spec, real_split
    from stablesdg.config import parse_params
    from stablesdg.registry import CHAMPION, client
    from stablesdg.stages.export import export_champion
    from stablesdg.stages.train import log_classifier

    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        processed = make_processed(root, THREE_CLASSES, per_class=12, size=EXPORT_SIZE)
        params = parse_params(export_raw_params(max_accuracy_drop=100.0))
        spec = make_spec(THREE_CLASSES, params.classifier)
        model = quick_model(load_images(*real_split(processed, THREE_CLASSES, "train"), spec))
        with tracking.stage_run("train", params, inputs=[processed]) as run:
            uri = log_classifier(model, spec)
        name = params.tracking.registered_model
        data_tags = {k: v for k, v in mlflow.get_run(run.info.run_id).data.tags.items() if k.startswith("data_")}
        version = mlflow.register_model(uri, name, tags=data_tags)
        client().set_registered_model_alias(name, CHAMPION, version.version)
        summary = export_champion(params, processed, root / "models" / "classifier.onnx", root / "models" / "quantized")
        test = load_images(*real_split(processed, THREE_CLASSES, "test"), spec)
        yield Shipped(root, processed, params, model, test, summary)


REGISTRY_NAME = "steel-defect-classifier"


def registry_params() -> object:
    from stablesdg.config import parse_params

    return parse_params({
        "seed": 7, "classes": {c: {"initializer": "line"} for c in THREE_CLASSES},
        "classifier": {"backbone": "mobilenet_v3_small", "input_size": 48, "epochs": 4, "batch_size": 8,
                       "learning_rate": 0.003, "patience": 4, "repeats": 1},
    })


@pytest.fixture(scope="module")
def registry_trained(tmp_path_factory):
    """Two real datasets (different test sets) and one trained classifier."""
    from stablesdg.classifier import train_classifier
    from stablesdg.comparison import load_splits

    root = tmp_path_factory.mktemp("regdata")
    params = registry_params()
    processed = make_processed(root / "a", THREE_CLASSES, per_class=10, size=64, k_shot=4, seed=0)
    other = make_processed(root / "b", THREE_CLASSES, per_class=10, size=64, k_shot=4, seed=1)
    splits = load_splits(processed, root / "no-synthetic", params)
    other_splits = load_splits(other, root / "no-synthetic", params)
    model = train_classifier(splits.train, splits.val, splits.spec, params.classifier, params.seed).model
    return params, splits, other_splits, model


def log_and_register(model, splits, params, variant: str, **card):
    """Log `model` as a training run exactly as the train stage does, then apply the registry policy."""
    from stablesdg.classifier import TrainResult, evaluate
    from stablesdg.comparison import VariantResult, scorer_on_test_set
    from stablesdg.registry import ComparisonSet, Evidence, register_best
    from stablesdg.stages.train import log_classifier
    from stablesdg.tracking import stage_run

    tags = {"variant": variant, "test_set_sha256": splits.test_hash}
    with stage_run("train", params, inputs=[splits.root], run_name=variant, extra_tags=tags) as run:
        uri = log_classifier(model, splits.spec)
    result = VariantResult(variant, evaluate(model, splits.test, len(THREE_CLASSES)), TrainResult(model),
                           run.info.run_id, uri, splits.test_hash, len(splits.train), 0, len(splits.train))
    test = ComparisonSet(splits.test_hash, splits.spec, scorer_on_test_set(splits))
    evidence = Evidence(splits.root, **card)
    return result, register_best(params.tracking.registered_model, params.classifier, [result], test, None,
                                 run.info.run_id, evidence)
