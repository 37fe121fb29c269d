"""Image-oriented generation: denoise partly-noised real samples with the adapted model (img2img).

`txt2img` (pure noise) is the ablation; strength 1 means the same thing. Every image's seed is derived from
(seed, class, source image, index), so any single image can be regenerated bit-for-bit on the same hardware,
and an interrupted run resumes by making only the missing batches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .config import ConfigError, GenerateConfig, ModelConfig, Params
from .data import split_paths
from .diffusion import EMBEDS_FILE, LORA_FILE, UNET_DIR, base_model_record, load_base_pipeline
from .errors import MissingInputError
from .schedulers import make_scheduler
from .utils import derive_seed, pick_device, read_json, sha256_file, write_json

PROMPT = "A photo of {}"


@dataclass(frozen=True)
class Settings:
    strength: float
    guidance_scale: float
    steps: int
    scheduler: str = "ddim"
    mode: str = "img2img"

    @property
    def pure_noise(self) -> bool:
        return self.mode == "txt2img" or self.strength >= 1.0


def generation_dtype(precision: str, device: str) -> torch.dtype:
    """generate.precision on this device: `auto` is fp16 on CUDA (diffusers' usual inference precision)."""
    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if precision == "fp16" and device == "cpu":  # diffusers' fp16 U-Net fails on CPU with a dtype mismatch
        raise ConfigError("generate.precision: fp16 needs a GPU; on the CPU use bf16 or fp32 (or auto)")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_adapted_pipeline(model: ModelConfig, cls: str, adapter_dir: Path, device: str = "cpu",
                          dtype: torch.dtype = torch.float32):
    """Base model + the class's adapter files, through the stock diffusers loaders a user would call."""
    for name in (EMBEDS_FILE, LORA_FILE):
        if not (adapter_dir / name).exists():
            raise MissingInputError(f"{adapter_dir / name} not found: run `dvc repro adapt@{cls}` first")
    pipe = load_base_pipeline(model, device, dtype)
    if (adapter_dir / UNET_DIR).is_dir():  # adapt.lora.unet: full, a fine-tuned copy of the base U-Net
        from diffusers import UNet2DConditionModel  # lazy: diffusers is slow to import

        pipe.unet = UNet2DConditionModel.from_pretrained(adapter_dir, subfolder=UNET_DIR).to(device, dtype)
    pipe.load_textual_inversion(str(adapter_dir), weight_name=EMBEDS_FILE)
    pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_FILE)
    return pipe


def generation_resolution(generate: GenerateConfig, model: ModelConfig) -> int:
    return generate.resolution or model.resolution


def _to_model_input(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB").resize((resolution, resolution), Image.BICUBIC)


def _to_dataset_format(img: Image.Image, size: int, color_mode: str) -> Image.Image:
    return img.convert(color_mode).resize((size, size), Image.BICUBIC)


@torch.no_grad()
def generate_batch(pipe, prompt: str, sources: list[Path], settings: Settings, seeds: list[int],
                   resolution: int, out_size: int, color_mode: str) -> list[Image.Image]:
    """One batch; each image has its own generator, so an image does not depend on its batch-mates' seeds."""
    from diffusers import StableDiffusionPipeline  # lazy: diffusers is slow to import

    if not settings.pure_noise and settings.steps * settings.strength < 1:
        # No denoising step at all: the image-oriented start point is the source itself.
        return [_to_dataset_format(_to_model_input(p, resolution), out_size, color_mode) for p in sources]
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    common = dict(prompt=[prompt] * len(seeds), num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance_scale, generator=generators)
    if settings.pure_noise:
        txt2img = StableDiffusionPipeline.from_pipe(pipe)
        txt2img.set_progress_bar_config(disable=True)
        images = txt2img(height=resolution, width=resolution, **common).images
    else:
        inputs = [_to_model_input(p, resolution) for p in sources]
        images = pipe(image=inputs, strength=settings.strength, **common).images
    return [_to_dataset_format(img, out_size, color_mode) for img in images]


def render(pipe, params: Params, cls: str, sources: list[Path], strength: float, guidance_scale: float,
           steps: int, seeds: list[int], mode: str | None = None, scheduler: str | None = None) -> list[Image.Image]:
    """Images for `sources` with explicit settings (grids, search trials)."""
    settings = Settings(strength, guidance_scale, steps, scheduler or params.generate.scheduler,
                        mode or params.generate.mode)
    prompt = PROMPT.format(params.model.placeholder.format(cls=cls))
    out: list[Image.Image] = []
    bs = params.generate.batch_size
    for i in range(0, len(sources), bs):
        out += generate_batch(pipe, prompt, sources[i:i + bs], settings, seeds[i:i + bs],
                              generation_resolution(params.generate, params.model), params.data.image_size,
                              params.data.color_mode)
    return out


# --------------------------------------------------------------------------------------- the class's set
def chosen_settings(g: GenerateConfig, search_file: Path) -> tuple[Settings, str]:
    """Search result when enabled and present, else params; returns (settings, where they came from)."""
    if g.use_search and search_file.exists():
        best = read_json(search_file)["best"]
        return Settings(float(best["strength"]), float(best["guidance_scale"]), int(best["steps"]),
                        best.get("scheduler", g.scheduler), g.mode), str(search_file)
    return Settings(g.strength, g.guidance_scale, g.steps, g.scheduler, g.mode), "params.yaml"


def plan(seed: int, cls: str, sources: list[Path], n: int, settings: Settings,
         strengths: list[float] | None = None) -> list[dict]:
    """Which source, seed and strength each output index uses (round-robin over the real training images; with
    `strengths`, the r-th round over them uses strengths[r mod len])."""
    def strength(i: int) -> float:
        return strengths[(i // len(sources)) % len(strengths)] if strengths else settings.strength

    return [
        {"file": f"{cls}_{i:05d}.png", "index": i, "source": sources[i % len(sources)].name,
         "seed": derive_seed(seed, cls, sources[i % len(sources)].name, i), "strength": strength(i)}
        for i in range(n)
    ]


def fingerprint(params: Params, settings: Settings, adapter_hashes: dict, sources: list[Path]) -> str:
    """What a class's synthetic set depends on: images of a run with another fingerprint are not kept."""
    parts = {
        "seed": params.seed, "settings": asdict(settings), "base": base_model_record(params.model),
        "adapter": adapter_hashes, "sources": [sha256_file(p) for p in sources],
        "resolution": generation_resolution(params.generate, params.model), "size": params.data.image_size, "mode": params.data.color_mode,
        "placeholder": params.model.placeholder, "batch": params.generate.batch_size,
        **({"strengths": params.generate.strengths} if params.generate.strengths else {}),
        **({"precision": params.generate.precision} if params.generate.precision != "auto" else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _kept_records(out_dir: Path, fp: str) -> dict[str, dict]:
    """Records of a previous run with the same fingerprint whose files are still intact."""
    manifest = out_dir / "manifest.json"
    if not manifest.exists() or read_json(manifest).get("fingerprint") != fp:
        return {}
    return {r["file"]: r for r in read_json(manifest)["images"]
            if (out_dir / r["file"]).exists() and sha256_file(out_dir / r["file"]) == r["sha256"]}


def generate_class(params: Params, cls: str, processed: Path, adapter_dir: Path, out_dir: Path,
                   search_file: Path, pipe=None, stop_after_batches: int | None = None) -> dict:
    """Write `per_class` images + manifest.json into out_dir, keeping intact images of an interrupted run."""
    sources = split_paths(processed, cls, "train")
    settings, origin = chosen_settings(params.generate, search_file)
    adapter = read_json(adapter_dir / "adapter.json")
    fp = fingerprint(params, settings, adapter["sha256"], sources)
    kept = _kept_records(out_dir, fp)
    if not kept and out_dir.exists():
        shutil.rmtree(out_dir)  # stale images from other settings must not mix into this set
    out_dir.mkdir(parents=True, exist_ok=True)
    for stray in (p for p in out_dir.glob("*.png") if p.name not in kept):
        stray.unlink()
    items = plan(params.seed, cls, sources, params.generate.per_class, settings, params.generate.strengths)
    header = {"class": cls, "fingerprint": fp, "settings": asdict(settings), "settings_from": origin,
              **base_model_record(params.model), "resolution": generation_resolution(params.generate, params.model),
              "adapter_sha256": adapter["sha256"],
              "prompt": PROMPT.format(adapter["placeholder"])}
    by_name = {p.name: p for p in sources}
    bs = params.generate.batch_size
    batches = [items[i:i + bs] for i in range(0, len(items), bs)]
    todo = [b for b in batches if not all(it["file"] in kept for it in b)]
    if todo and pipe is None:
        device = pick_device(params.generate.device)
        pipe = load_adapted_pipeline(params.model, cls, adapter_dir, device,
                                     generation_dtype(params.generate.precision, device))
    for done, batch in enumerate(tqdm(todo, desc=f"generate {cls}", unit="batch")):
        if stop_after_batches is not None and done >= stop_after_batches:
            break
        for group in _same_strength(batch):
            item_settings = replace(settings, strength=group[0]["strength"])
            images = generate_batch(pipe, header["prompt"], [by_name[it["source"]] for it in group], item_settings,
                                    [it["seed"] for it in group],
                                    generation_resolution(params.generate, params.model),
                                    params.data.image_size, params.data.color_mode)
            for it, img in zip(group, images, strict=True):
                img.save(out_dir / it["file"])
                kept[it["file"]] = {**it, "sha256": sha256_file(out_dir / it["file"]), **asdict(item_settings)}
        _write_manifest(out_dir, header, kept)
    _write_manifest(out_dir, header, kept)
    return {**header, "images": len(kept)}


def _same_strength(batch: list[dict]) -> list[list[dict]]:
    """A batch split into runs of one strength (one pipeline call denoises from one noise level)."""
    groups: list[list[dict]] = []
    for it in batch:
        if groups and groups[-1][0]["strength"] == it["strength"]:
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


def _write_manifest(out_dir: Path, header: dict, records: dict[str, dict]) -> None:
    write_json(out_dir / "manifest.json", {**header, "images": [records[k] for k in sorted(records)]})
