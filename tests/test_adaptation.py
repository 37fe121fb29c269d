"""Textual inversion + LoRA on the built-in tiny SD model (CPU, offline), and generation from its files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import adapt_params
from diffusers import StableDiffusionImg2ImgPipeline
from safetensors.torch import load_file

from stablesdg.adaptation import (
    AdaptRun,
    ClassData,
    adapt_class,
    add_placeholder_token,
    class_data,
    diffusion_loss,
    prompt_ids,
)
from stablesdg.adaptation_state import checkpoint_fingerprint
from stablesdg.diffusion import BaseModelError, load_base_pipeline, resolve_base_model
from stablesdg.errors import AdaptationError, MissingInputError
from stablesdg.generation import generate_class, load_adapted_pipeline, render
from stablesdg.utils import sha256_file, sha256_tree


def _base(name: str) -> str:
    """Parameter name before LoRA injection wrapped the layer."""
    return name.replace(".base_layer", "")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_embedding_stage_changes_only_the_placeholder_row(processed, tmp_path):
    params = adapt_params()
    pipe = load_base_pipeline(params.model)
    data = class_data(params, processed, "crazing")
    unet_before, vae_before = _snapshot(pipe.unet), _snapshot(pipe.vae)
    text_before = _snapshot(pipe.text_encoder)
    AdaptRun(params, data, tmp_path / "out", tmp_path / "ckpt", stages=("embedding",)).run(pipe)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<crazing>")
    init_id = pipe.tokenizer.encode("crack", add_special_tokens=False)[0]
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    old = next(v for k, v in text_before.items() if k.endswith("token_embedding.weight"))
    assert torch.equal(emb[: old.shape[0]], old), "every pre-existing row must stay bit-identical"
    assert not torch.equal(emb[token_id], old[init_id]), "the placeholder row must have moved"
    for name, value in _snapshot(pipe.text_encoder).items():
        if "token_embedding" not in name and "lora" not in name:
            assert torch.equal(value, text_before[_base(name)]), name
    assert all(torch.equal(p, unet_before[_base(n)]) for n, p in _snapshot(pipe.unet).items() if "lora" not in n)
    assert all(torch.equal(p, vae_before[n]) for n, p in _snapshot(pipe.vae).items())


def test_lora_stage_changes_only_lora_parameters(processed, tmp_path):
    params = adapt_params(adapt={"embedding": {"steps": 0}})
    pipe = load_base_pipeline(params.model)
    base_unet, base_text = _snapshot(pipe.unet), _snapshot(pipe.text_encoder)
    data = class_data(params, processed, "scratches")
    AdaptRun(params, data, tmp_path / "out", tmp_path / "ckpt").run(pipe)
    unet_after, text_after = _snapshot(pipe.unet), _snapshot(pipe.text_encoder)
    lora_unet = [n for n in unet_after if "lora_" in n]
    lora_text = [n for n in text_after if "lora_" in n]
    assert any(".to_q.lora_A" in n for n in lora_unet) and any("to_out.0.lora_B" in n for n in lora_unet)
    assert any("q_proj.lora_A" in n for n in lora_text) and any("out_proj.lora_B" in n for n in lora_text)
    for name in lora_unet + lora_text:  # B starts at zero: a trained adapter has non-zero B
        if "lora_B" in name:
            assert (unet_after.get(name, text_after.get(name))).abs().sum() > 0, name
    for name, value in unet_after.items():
        if "lora_" not in name:
            assert torch.equal(value, base_unet[_base(name)]), name
    for name, value in text_after.items():
        if "lora_" not in name and "token_embedding" not in name:
            assert torch.equal(value, base_text[_base(name)]), name


def test_loss_falls_on_a_fixed_batch(processed, tmp_path):
    params = adapt_params(adapt={"embedding": {"steps": 0},
                                 "lora": {"steps": 40, "batch_size": 3, "rank": 4, "alpha": 4.0,
                                          "unet_learning_rate": 0.01, "text_learning_rate": 0.001}})
    data = class_data(params, processed, "crazing")

    def fixed_loss(pipe) -> float:
        gen = torch.Generator().manual_seed(1234)
        ids = prompt_ids(pipe, data, ["A photo of {}"], len(data.pixels), gen)
        with torch.no_grad():
            return float(diffusion_loss(pipe, data.pixels, ids, gen))

    untrained = load_base_pipeline(params.model)
    add_placeholder_token(untrained, data.placeholder, data.initializer)
    before = fixed_loss(untrained)
    pipe = load_base_pipeline(params.model)
    run = AdaptRun(params, data, tmp_path / "out", tmp_path / "ckpt")
    run.run(pipe)
    after = fixed_loss(pipe)
    losses = [loss for _, stage, loss in run.losses if stage == "lora"]
    assert after < before * 0.95, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_adapt_resolution_trains_at_its_own_scale(processed, tmp_path):
    """adapt.resolution (null = model.resolution) sets the scale the LoRA sees; the conv U-Net trains at it."""
    assert class_data(adapt_params(), processed, "crazing").pixels.shape[-2:] == (32, 32)
    params = adapt_params(adapt={"resolution": 48, "embedding": {"steps": 2}, "lora": {"steps": 2}})
    data = class_data(params, processed, "crazing")
    assert data.pixels.shape[-2:] == (48, 48)
    run = AdaptRun(params, data, tmp_path / "out", tmp_path / "ckpt")
    run.run(load_base_pipeline(params.model))
    assert len(run.losses) == 4 and all(np.isfinite(loss) for _, _, loss in run.losses)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_full_unet_fine_tuning_trains_every_weight_and_loads_back(processed, tmp_path):
    """adapt.lora.unet: full (DreamBooth-style): every U-Net weight moves, the text encoder keeps LoRA, and the
    stock loaders bring the same model back."""
    from diffusers import UNet2DConditionModel

    params = adapt_params(adapt={"embedding": {"steps": 1},
                                 "lora": {"steps": 3, "unet": "full", "unet_learning_rate": 1e-3}})
    pipe = load_base_pipeline(params.model)
    before = _snapshot(pipe.unet)
    _, record = adapt_class(params, "crazing", processed, tmp_path / "adapters", checkpoint_root=tmp_path / "ck")
    out = tmp_path / "adapters" / "crazing"
    saved = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    moved = [n for n, p in saved.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > 0.9 * len(before), f"only {len(moved)} of {len(before)} U-Net tensors moved"
    assert not any("lora" in n for n, _ in saved.named_parameters())
    assert record["unet"] == "full" and any(k.startswith("unet/") for k in record["sha256"])
    loaded = load_adapted_pipeline(params.model, "crazing", out)
    assert all(torch.equal(p, dict(saved.named_parameters())[n]) for n, p in loaded.unet.named_parameters())
    assert any("lora_" in n for n, _ in loaded.text_encoder.named_parameters()), "the text encoder keeps LoRA"


@pytest.fixture(scope="module")
def adapted(processed, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapted")
    params = adapt_params()
    pipe, record = adapt_class(params, "crazing", processed, root / "adapters",
                               checkpoint_root=root / "ckpt")
    return params, pipe, record, root


def test_adapter_files_load_with_stock_diffusers_and_reproduce_outputs(adapted, processed):
    params, trained_pipe, record, root = adapted
    folder = root / "adapters" / "crazing"
    assert record["sha256"]["pytorch_lora_weights.safetensors"] == sha256_file(folder / "pytorch_lora_weights.safetensors")
    base_path, _ = resolve_base_model(params.model)
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(base_path, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    stock.load_textual_inversion(str(folder), weight_name="learned_embeds.safetensors")
    stock.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in n for n, _ in stock.text_encoder.named_modules()), "text-encoder LoRA not loaded"
    sources = sorted((processed / "images" / "crazing").glob("*.png"))[:2]
    kwargs = dict(strength=0.7, guidance_scale=4.0, steps=5, seeds=[11, 12])
    ours = render(trained_pipe, params, "crazing", sources, **kwargs)
    theirs = render(stock, params, "crazing", sources, **kwargs)
    diff = max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(ours, theirs, strict=True))
    assert diff <= 1.0, f"stock-loaded adapter differs from the trained model by {diff} grey levels"
    base = render(load_base_pipeline(params.model), params, "crazing", sources, **kwargs)
    moved = max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(ours, base, strict=True))
    assert moved > 1.0, "the adapter must change what the model makes"


def test_strength_near_zero_returns_source_and_one_ignores_it(adapted, processed):
    params, pipe, _, _ = adapted
    sources = sorted((processed / "images" / "crazing").glob("*.png"))[:2]
    same = render(pipe, params, "crazing", sources, strength=0.01, guidance_scale=4.0, steps=10, seeds=[5, 5])
    for img, src in zip(same, sources, strict=True):
        expected = np.asarray(__import__("PIL.Image").Image.open(src).convert("RGB").resize((32, 32))
                              .convert("L").resize((48, 48)))
        assert np.abs(np.asarray(img, float) - expected).max() <= 2
    pure = render(pipe, params, "crazing", sources, strength=1.0, guidance_scale=4.0, steps=4, seeds=[5, 5])
    assert np.array_equal(np.asarray(pure[0]), np.asarray(pure[1])), "strength 1 must not depend on the source"
    partial = render(pipe, params, "crazing", sources, strength=0.5, guidance_scale=4.0, steps=4, seeds=[5, 5])
    assert not np.array_equal(np.asarray(partial[0]), np.asarray(partial[1]))


def test_generation_resolution_overrides_the_model_resolution(adapted, processed, tmp_path):
    """`generate.resolution` renders above the adaptation resolution (32 here) and keeps the source's detail."""
    import dataclasses

    from PIL import Image

    params, pipe, _, root = adapted
    at48 = dataclasses.replace(params, generate=dataclasses.replace(params.generate, resolution=48))
    sources = sorted((processed / "images" / "crazing").glob("*.png"))[:2]
    kept = render(pipe, at48, "crazing", sources, strength=0.01, guidance_scale=4.0, steps=10, seeds=[5, 5])
    for img, src in zip(kept, sources, strict=True):
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(src).convert("L")))  # no 32 px round trip
    low = render(pipe, params, "crazing", sources, strength=0.5, guidance_scale=4.0, steps=4, seeds=[5, 5])
    high = render(pipe, at48, "crazing", sources, strength=0.5, guidance_scale=4.0, steps=4, seeds=[5, 5])
    assert high[0].size == low[0].size == (48, 48)
    assert not np.array_equal(np.asarray(high[0]), np.asarray(low[0]))
    made = generate_class(at48, "crazing", processed, root / "adapters" / "crazing", tmp_path / "g", tmp_path / "x")
    assert made["resolution"] == 48
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["resolution"] == 48


def test_generation_same_seed_same_bytes_and_resume_equals_straight(adapted, processed, tmp_path):
    params, _, _, root = adapted
    adapter = root / "adapters" / "crazing"
    straight = generate_class(params, "crazing", processed, adapter, tmp_path / "a", tmp_path / "none.json")
    again = generate_class(params, "crazing", processed, adapter, tmp_path / "b", tmp_path / "none.json")
    assert straight["images"] == 5
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    partial = generate_class(params, "crazing", processed, adapter, tmp_path / "c", tmp_path / "none.json",
                             stop_after_batches=1)
    assert partial["images"] == 2
    (tmp_path / "c" / "crazing_00001.png").write_bytes(b"corrupted by a crash")
    resumed = generate_class(params, "crazing", processed, adapter, tmp_path / "c", tmp_path / "none.json")
    assert resumed["images"] == 5
    assert sha256_tree(tmp_path / "c") == sha256_tree(tmp_path / "a")
    assert again["fingerprint"] == straight["fingerprint"]


def test_adaptation_resumed_after_interruption_equals_straight_run(processed, tmp_path):
    params = adapt_params()
    _, straight = adapt_class(params, "scratches", processed, tmp_path / "a",
                              checkpoint_root=tmp_path / "ck_a")
    for stop in (3, 5):  # once inside stage 1, once inside stage 2
        ckpt = tmp_path / f"ck_{stop}"
        _, partial = adapt_class(params, "scratches", processed, tmp_path / f"b{stop}",
                                 checkpoint_root=ckpt, max_steps_this_run=stop + 6 * (stop == 5))
        assert partial is None
        _, resumed = adapt_class(params, "scratches", processed, tmp_path / f"b{stop}",
                                 checkpoint_root=ckpt)
        assert resumed is not None
        # Equal up to float summation order: oneDNN picks CPU kernels by buffer alignment, so even two
        # straight runs in one process can differ in the last bits.
        for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
            a, b = load_file(tmp_path / "a" / "scratches" / name), load_file(tmp_path / f"b{stop}" / "scratches" / name)
            assert a.keys() == b.keys()
            worst = max(float((a[k] - b[k]).abs().max()) for k in a)
            assert worst < 1e-5, f"resume after {stop} steps differs by {worst} in {name}"


def test_offline_hub_id_names_what_to_download():
    params = adapt_params(model={"base": "someone/no-such-model-xyz"})
    with pytest.raises(BaseModelError, match=r"`hf download someone/no-such-model-xyz"):
        load_base_pipeline(params.model)


def test_initializer_must_be_one_token(processed, tmp_path):
    params = adapt_params(classes={"crazing": {"initializer": "zqxjkv"}})
    with pytest.raises(AdaptationError, match="initializer"):
        adapt_class(params, "crazing", processed, tmp_path, checkpoint_root=tmp_path)


def test_adapted_pipeline_loader_refuses_missing_files(tmp_path):
    with pytest.raises(MissingInputError, match="learned_embeds.safetensors not found"):
        load_adapted_pipeline(adapt_params().model, "crazing", tmp_path)


def test_records_name_project_folders_relative_to_the_project(tmp_path, monkeypatch):
    from stablesdg.diffusion import portable_path

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "models" / "base")) == "models/base"
    assert portable_path("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert portable_path("/opt/elsewhere") == "/opt/elsewhere"


def test_lora_file_header_is_canonical(tmp_path):
    """safetensors writes its metadata map in per-process hash order; the saved file must not depend on it."""
    from safetensors.torch import save_file

    from stablesdg.utils import canonical_safetensors_header

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}
    variants = []
    for i, meta in enumerate(({"x": "1", "y": "2", "z": "3"}, {"z": "3", "x": "1", "y": "2"})):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, path, metadata=meta)
        canonical_safetensors_header(path)
        variants.append(path.read_bytes())
        loaded = load_file(path)
        assert torch.equal(loaded["b"], tensors["b"]) and torch.equal(loaded["a"], tensors["a"])
    assert variants[0] == variants[1]


def test_a_checkpoint_of_another_base_model_is_not_resumed(processed, tmp_path):
    """Same params, re-pretrained prior under the same path: resuming its checkpoint would load foreign weights."""
    params = adapt_params()
    data = ClassData("scratches", "<scratches>", "scratch", torch.zeros(1, 3, 8, 8), [])
    folder = tmp_path / "base"
    shutil.copytree(resolve_base_model(params.model)[0], folder)
    local = adapt_params(model={"base": str(folder)})
    before = checkpoint_fingerprint(local, data)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert checkpoint_fingerprint(local, data) != before
    assert checkpoint_fingerprint(adapt_params(model={"tiny_seed": 1}), data) != checkpoint_fingerprint(params, data)


def test_every_sampler_renders_reproducibly_and_the_stochastic_ones_differ_from_ddim(adapted, processed):
    from stablesdg.schedulers import SCHEDULERS

    params, pipe, _, _ = adapted
    sources = sorted((processed / "images" / "crazing").glob("*.png"))[:2]
    kwargs = dict(strength=0.6, guidance_scale=4.0, steps=5, seeds=[3, 4])
    made = {name: [np.asarray(i) for i in render(pipe, params, "crazing", sources, scheduler=name, **kwargs)]
            for name in SCHEDULERS}
    again = [np.asarray(i) for i in render(pipe, params, "crazing", sources, scheduler="dpmpp_sde", **kwargs)]
    assert all(np.array_equal(a, b) for a, b in zip(again, made["dpmpp_sde"], strict=True)), "seeded per image"
    for name in ("ddpm", "euler_ancestral", "dpmpp_sde", "dpm"):
        assert not np.array_equal(made[name][0], made["ddim"][0]), f"{name} rendered what ddim did"
    # `dpm` after `dpmpp_sde` on the same pipeline: the SDE setting must not leak into the next sampler
    after = [np.asarray(i) for i in render(pipe, params, "crazing", sources, scheduler="dpm", **kwargs)]
    assert np.array_equal(after[0], made["dpm"][0])


def test_strength_set_gives_each_source_a_variant_at_every_strength(adapted, processed, tmp_path):
    import dataclasses

    params, _, _, root = adapted
    sets = dataclasses.replace(params, generate=dataclasses.replace(params.generate, per_class=6,
                                                                    strengths=[0.3, 1.0]))
    made = generate_class(sets, "crazing", processed, root / "adapters" / "crazing", tmp_path / "g",
                          tmp_path / "none.json")
    records = json.loads((tmp_path / "g" / "manifest.json").read_text())["images"]
    assert made["images"] == 6
    sources = sorted({r["source"] for r in records})
    assert len(sources) == 3
    assert {(r["source"], r["strength"]) for r in records} == {(s, v) for s in sources for v in (0.3, 1.0)}
    plain = generate_class(params, "crazing", processed, root / "adapters" / "crazing", tmp_path / "p",
                           tmp_path / "none.json")
    assert plain["fingerprint"] != made["fingerprint"], "the strength set is part of what the set depends on"
