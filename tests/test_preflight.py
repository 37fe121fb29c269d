"""Real-size fixtures and the base-model preflight: CLIP's real BPE, SD 1.5 / 2.1 architectures (checked on the
meta device against the published parameter counts), a small folder written by the same builder with CLIP's
tokenizer, and the checks on it (complete, a two-token initializer); the `check-base` stage's command is in
tests/stages/test_check_base.py."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import MINI_CLASSES, mini_arch
from diffusers import StableDiffusionImg2ImgPipeline
from transformers import CLIPTokenizer

from stablesdg.basemodels import ARCHS, build_components, write_clip_tokenizer
from stablesdg.config import parse_params
from stablesdg.diffusion import BaseModelError, load_base_pipeline
from stablesdg.generation import generation_dtype
from stablesdg.preflight import base_model_fingerprint, check_base, render_report, require_base
from stablesdg.utils import write_json


def params_for(folder: Path, classes: dict | None = None, **model):
    return parse_params({"classes": classes or MINI_CLASSES, "model": {"base": str(folder), "resolution": 64, **model},
                         "adapt": {"device": "cpu"}})


# --------------------------------------------------------------------------------------- tokenizer, archs
def test_clip_bpe_from_open_clip_gives_clips_token_ids(tmp_path):
    write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.tokenize("crazing") == ["cra", "zing</w>"]  # one token in the tiny BPE, two in CLIP's
    assert tok.tokenize("crack") == ["crack</w>"]


@pytest.mark.parametrize("arch, counts", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sd21", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
])
def test_architectures_have_the_published_parameter_counts(arch, counts):
    """The counts of the published checkpoints: one wrong width, head or layer count changes them."""
    modules = build_components(ARCHS[arch], device="meta")
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()} == counts
    text = modules["text_encoder"].config
    assert (text.hidden_act, ARCHS[arch].scheduler.get("prediction_type", "epsilon")) == \
        {"sd15": ("quick_gelu", "epsilon"), "sd21": ("gelu", "v_prediction")}[arch]
    assert modules["vae"].config.scaling_factor == 0.18215 and modules["vae"].config.latent_channels == 4


# --------------------------------------------------------------------------------------- the folder
def test_built_folder_loads_with_stock_diffusers_despite_the_listed_safety_checker(mini_folder):
    index = json.loads((mini_folder / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert not (mini_folder / "safety_checker").exists()  # as in a folder copied without it
    assert (mini_folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(mini_folder, safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
    assert stock.unet.config.cross_attention_dim == 32
    header = json.loads((lambda b: b[8:8 + int.from_bytes(b[:8], "little")])(
        (mini_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}  # written in fp16
    pipe = load_base_pipeline(params_for(mini_folder).model)  # ours: fp32 for CPU training
    assert pipe.unet.dtype == torch.float32 and pipe.safety_checker is None
    assert pipe.tokenizer("a photo of a cat").input_ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_check_base_on_a_complete_folder(mini_folder):
    report = check_base(params_for(mini_folder))
    text = render_report(report)
    assert not report.problems, text
    assert "ok       unet/diffusion_pytorch_model.safetensors" in text
    assert "listed, not loaded: feature_extractor, safety_checker" in text
    assert report.architecture["family"] == "not SD 1.x/2.x"  # cross-attention 32: SD 1.x has 768, 2.x 1024
    assert report.architecture["prediction_type"] == "epsilon"
    n = sum(sum(p.numel() for p in m.parameters()) for m in build_components(mini_arch(), "meta").values())
    assert sum(report.architecture["parameters"].values()) == n
    assert report.device == "cpu" and report.memory["precision"] == "fp32"
    assert not report.warnings  # small model: no real-size CPU warning


def test_two_token_initializer_is_caught_with_single_token_alternatives(mini_folder, tmp_path):
    classes = {"crazing": {"initializer": "crazing"}, "pitted_surface": {"initializer": "pitted"}}
    report = check_base(params_for(mini_folder, classes))
    assert len(report.problems) == 2
    tok = CLIPTokenizer.from_pretrained(mini_folder / "tokenizer")
    by_class = {c["class"]: c for c in report.initializers}
    assert by_class["crazing"]["tokens"] == ["cra", "zing</w>"]
    assert "pit" in by_class["pitted_surface"]["alternatives"]
    for check in by_class.values():
        assert check["alternatives"] and all(len(tok.tokenize(a)) == 1 for a in check["alternatives"])
    assert "'crazing' is 2 tokens for this tokenizer (cra|zing)" in report.problems[0]
    with pytest.raises(BaseModelError, match="'pitted' is 2 tokens"):
        require_base(params_for(mini_folder, classes), ["pitted_surface"])
    with pytest.raises(BaseModelError) as stopped:
        require_base(params_for(mini_folder, classes), ["crazing"])
    assert report.problems[0] in str(stopped.value)  # the stage says what check-base says


def test_fingerprint_hashes_only_the_files_diffusers_loads(mini_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(mini_folder, folder)
    model = params_for(folder).model
    before = base_model_fingerprint(model)
    (folder / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x" * 1_000_000)  # a hub download's extra file
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"y")  # a variant not loaded
    assert base_model_fingerprint(model) == before
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert base_model_fingerprint(model) != before


# --------------------------------------------------------------------------------------- the other fixes
def test_offline_hint_names_the_installed_hf_command():
    from stablesdg.diffusion import offline_hint

    assert "`hf download org/model --local-dir models/base/model`" in offline_hint("org/model")
    assert (Path(sys.executable).parent / "hf").exists()  # huggingface_hub ships `hf` (no `huggingface-cli`)


def test_json_reports_are_strict_without_bootstrap(tmp_path):
    write_json(tmp_path / "r.json", {"fid_std": math.nan, "trials": [{"x": math.inf, "y": 1.5}]})

    def reject(constant):
        raise ValueError(constant)

    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=reject)
    assert data == {"fid_std": None, "trials": [{"x": None, "y": 1.5}]}


def test_generation_precision_follows_the_device():
    assert generation_dtype("auto", "cpu") == torch.float32
    assert generation_dtype("auto", "cuda") == torch.float16
    assert generation_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        generation_dtype("fp16", "cpu")
    with pytest.raises(Exception, match="generate.precision"):
        parse_params({"generate": {"precision": "fp8"}})


def test_bf16_generation_runs_and_differs_from_fp32(mini_folder):
    """A reduced-precision pipeline really computes in that dtype (bf16 runs on CPU too; fp16 needs CUDA)."""
    model = params_for(mini_folder).model
    images = []
    for dtype in (torch.float32, torch.bfloat16):
        pipe = load_base_pipeline(model, "cpu", dtype)
        assert pipe.unet.dtype == dtype and pipe.vae.dtype == dtype
        out = pipe(prompt="a photo of a crack", image=torch.zeros(1, 3, 64, 64), strength=0.5,
                   num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        assert out.shape == (1, 64, 64, 3) and bool((out >= 0).all() and (out <= 1).all())
        images.append(out)
    assert not (images[0] == images[1]).all()
