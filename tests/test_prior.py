"""The embedded prior: corpus pretraining (tiny recipe), stock loading, integrity check, SSIM; the `stablesdg prior`
commands are in tests/commands/test_prior.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PRIOR_TINY
from PIL import Image

from stablesdg.diffusion import EMBEDDED_PRIOR
from stablesdg.metrics import psnr, ssim
from stablesdg.pretraining.corpus import CorpusError, FolderCorpus
from stablesdg.pretraining.prior import (
    PACKING_FILE,
    PriorRecipe,
    StepPlan,
    pretrain,
    ssim_torch,
    verify_prior,
    view_batches,
)
from stablesdg.utils import read_json


def test_pretrain_records_corpus_recipe_and_every_file(tiny_prior, prior_corpus):
    out, record = tiny_prior
    recipe = record["recipe"]
    assert recipe["corpus"] == prior_corpus.name and recipe["corpus_images"] == 8
    assert recipe["corpus_manifest_sha256"] == FolderCorpus(prior_corpus, 32).manifest_sha256()
    assert record["device"] == "cpu" and record["steps"] == {"vae": 3, "unet": 3} and record["seconds"] > 0
    assert "unet/diffusion_pytorch_model.safetensors" in record["files"]
    assert read_json(out / "recipe.json") == json.loads(json.dumps(record))
    assert verify_prior(out) == []
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b" ")
    assert verify_prior(out) == ["vae/diffusion_pytorch_model.safetensors"]
    weights.write_bytes(original)


def test_pretraining_is_deterministic(prior_corpus, tmp_path, tiny_prior):
    _, record = tiny_prior
    again = pretrain(PriorRecipe(**PRIOR_TINY), tmp_path / "again", prior_corpus)
    assert again["files"]["unet/diffusion_pytorch_model.safetensors"] == \
        record["files"]["unet/diffusion_pytorch_model.safetensors"]


def test_stock_diffusers_loads_the_prior_and_denoises_at_its_resolution(tiny_prior):
    from diffusers import StableDiffusionImg2ImgPipeline

    out, _ = tiny_prior
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    result = pipe(prompt="a photo of crazing texture", image=image, strength=0.5, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()


def test_shipped_prior_is_intact_native_128_and_corpus_trained():
    record = read_json(EMBEDDED_PRIOR / "recipe.json")
    assert verify_prior(EMBEDDED_PRIOR) == []
    assert record["recipe"]["resolution"] == 128 and record["recipe"]["corpus"] == "surface-corpus"
    assert len(record["recipe"]["corpus_manifest_sha256"]) == 64 and record["device"] in ("cpu", "cuda")
    total = sum((EMBEDDED_PRIOR / f).stat().st_size for f in record["files"] if f.endswith(".safetensors"))
    assert total <= 40 * 2**20, "the shipped prior must stay within 40 MB of safetensors"
    unet = json.loads((EMBEDDED_PRIOR / "unet" / "config.json").read_text())
    vae = json.loads((EMBEDDED_PRIOR / "vae" / "config.json").read_text())
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 128


def test_ssim_matches_between_numpy_and_torch_and_orders_quality():
    rng = np.random.default_rng(0)
    a = (np.tile(np.linspace(60, 190, 48), (48, 1)) + rng.normal(0, 3, (48, 48))).astype(np.uint8)
    noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert ssim(a, noisy) < 0.9 and 20 < psnr(a, noisy) < 30
    # the training loss's SSIM (valid window) agrees with the report's (reflect padding) away from the border
    ta, tn = (torch.from_numpy(x.astype(np.float32) / 127.5 - 1)[None, None].expand(1, 3, -1, -1) for x in (a, noisy))
    assert float(ssim_torch(ta, tn)) == pytest.approx(ssim(a, noisy), abs=0.03)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CorpusError, match="no images found"):
        FolderCorpus(tmp_path / "empty", 32)


def test_step_plan_warms_up_and_decays_to_zero():
    plan = StepPlan(steps=200, seconds=0)
    factors = [plan.lr_factor(s) for s in range(200)]
    assert plan.warmup == 10 and factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[199] < 1e-3 and all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert [plan.after(s) for s in (0, 198, 199)] == [True, True, False]


def test_time_budget_fixes_the_step_count_after_the_probe(monkeypatch):
    now = [0.0]  # a fake clock: every step takes 0.5 s
    monkeypatch.setattr("stablesdg.pretraining.prior.time.perf_counter", lambda: now[0])
    plan = StepPlan(steps=10**9, seconds=1000)
    step = 0
    while plan.after(step):
        step += 1
        now[0] += 0.5
    assert plan.steps == step + 1 and 1995 <= plan.steps <= 2005  # 1000 s / 0.5 s
    assert plan.lr_factor(plan.steps - 1) < 1e-4


def test_view_batches_are_seeded_in_process_and_in_workers(prior_corpus):
    corpus = FolderCorpus(prior_corpus, 32)

    def take(workers):
        batches = view_batches(corpus, seed=3, count=4, crop=16, workers=workers)
        return [next(batches) for _ in range(3)]

    here, again = take(0), take(0)
    assert here[0][0].shape == (4, 16, 16) and here[0][0].dtype == torch.uint8
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(here, again, strict=True))
    assert not torch.equal(here[0][0], here[1][0])
    two, two_again = take(2), take(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(two, two_again, strict=True))
    assert not torch.equal(two[0][0], two[1][0])  # the two workers draw different views


def test_packed_corpus_is_recorded_under_its_source_and_ema_changes_the_weights(prior_corpus, tiny_prior, tmp_path):
    packed = tmp_path / "packed"
    for src in prior_corpus.rglob("*.png"):
        (packed / src.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(src).save((packed / src.parent.name / src.name).with_suffix(".webp"), "WEBP", quality=90)
    packing = {"source": "surface-corpus", "source_manifest_sha256": "ab" * 32, "format": "grey WebP quality 90"}
    (packed / PACKING_FILE).write_text(json.dumps(packing))
    record = pretrain(PriorRecipe(**{**PRIOR_TINY, "ema_decay": 0.9}), tmp_path / "ema", packed)
    assert record["recipe"]["corpus"] == "surface-corpus" and record["corpus_packing"] == packing
    assert record["recipe"]["corpus_images"] == 8
    assert record["files"]["unet/diffusion_pytorch_model.safetensors"] != \
        tiny_prior[1]["files"]["unet/diffusion_pytorch_model.safetensors"]
