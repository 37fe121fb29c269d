"""GPU numbers on the real-size model (issue 23, item 4): SD 1.5's architecture with random weights at 512 px.

For bf16 and fp16, each with and without gradient checkpointing (SDPA attention in all, as adapt uses on CUDA):
TI steps/s, LoRA steps/s, one search trial's generation time, img2img images/s and peak GPU memory. The anchor is
the same TI step with the settings of diffusers' `examples/textual_inversion` (frozen U-Net and VAE cast to the
fp16 weight dtype, text encoder fp32, fp16 autocast, no checkpointing), run in the same process and code.

    python benchmarks/bench_gpu.py                                  # GPU: one run, well under 10 minutes
    python benchmarks/bench_gpu.py --base tiny --resolution 64 --steps 3 --images 2   # CPU rehearsal

Writes benchmarks/results/gpu_realsize.json (or --out) and prints a table. No network needed: the model is
built here (`stablesdg base build-random`), the data are synthetic images.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

CONFIGS = [("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def generation(params, processed: Path, device: str, n_images: int) -> dict:
    """One search trial (images_per_trial at the first grid point) and img2img images/s, base weights in the
    generation precision (adapter loading is not timed: the base model is what costs)."""
    from stablesdg.data import split_paths
    from stablesdg.diffusion import load_base_pipeline
    from stablesdg.generation import generation_dtype, render

    cls = params.class_names[0]
    pipe = load_base_pipeline(params.model, device, generation_dtype(params.generate.precision, device))
    sources = split_paths(processed, cls, "train")
    s = params.search
    trial = (sources * s.images_per_trial)[:s.images_per_trial]
    synchronize(device)
    t0 = time.perf_counter()
    render(pipe, params, cls, trial, s.strength[0], s.guidance_scale[0], s.steps[0], list(range(len(trial))))
    synchronize(device)
    trial_s = time.perf_counter() - t0
    g = params.generate
    batch = (sources * n_images)[:n_images]
    t0 = time.perf_counter()
    render(pipe, params, cls, batch, g.strength, g.guidance_scale, g.steps, list(range(n_images)))
    synchronize(device)
    out = {"search_trial_s": round(trial_s, 2), "img2img_images_per_s": round(n_images / (time.perf_counter() - t0), 3)}
    del pipe
    return out


def one_config(params, processed: Path, tmp: Path, device: str, steps: int, n_images: int, name: str,
               prepare=None, generate: bool = True) -> dict:
    from bench_diffusion import run

    reset_peak(device)
    times = run(params, processed, tmp / name, steps, 0, prepare)
    record = {"config": name, "ti_steps_per_s": round(times["embedding_steps_per_s"], 3),
              "lora_steps_per_s": round(times["lora_steps_per_s"], 3), "train_peak_gib": peak_gib(device)}
    if generate:
        reset_peak(device)
        record |= generation(params, processed, device, n_images)
        record["generate_peak_gib"] = peak_gib(device)
    print(json.dumps(record), flush=True)
    return record


def diffusers_example_cast(pipe) -> None:
    """examples/textual_inversion/textual_inversion.py: frozen unet/vae in the weight dtype, text encoder fp32."""
    if pipe.unet.device.type != "cuda":  # CPU rehearsal: no autocast there, fp16 weights would not run
        return
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)


@click.command()
@click.option("--base", default=None, help="a model folder, or `tiny` (CPU rehearsal); default: build sd15")
@click.option("--resolution", default=512, show_default=True)
@click.option("--steps", default=10, show_default=True, help="TI and LoRA steps per configuration")
@click.option("--images", "n_images", default=8, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_realsize.json"), show_default=True)
def main(base: str | None, resolution: int, steps: int, n_images: int, batch: int, out: str) -> None:
    from bench_diffusion import machine, sd15_folder
    from conftest import make_processed

    from stablesdg.config import load_params
    from stablesdg.utils import pick_device

    params = load_params(ROOT / "params.yaml")
    device = pick_device("auto")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params.model.base = base or str(sd15_folder(tmp))
        params.model.resolution = params.data.image_size = resolution
        params.adapt.embedding.batch_size = params.adapt.lora.batch_size = batch
        params.search.images_per_trial = n_images
        processed = make_processed(tmp / "data", params.class_names[:1], per_class=8, size=min(resolution, 512))
        records = []
        for precision, checkpointing in CONFIGS:
            p = copy.deepcopy(params)
            p.adapt.mixed_precision, p.adapt.gradient_checkpointing = precision, checkpointing
            p.generate.precision = precision if device.startswith("cuda") else "auto"
            name = f"{precision}{'+ckpt' if checkpointing else ''}+sdpa"
            records.append(one_config(p, processed, tmp, device, steps, n_images, name,
                                      generate=not checkpointing))  # generation does not checkpoint
        anchor = copy.deepcopy(params)
        anchor.adapt.mixed_precision, anchor.adapt.gradient_checkpointing = "fp16", False
        records.append(one_config(anchor, processed, tmp, device, steps, n_images,
                                  "anchor: diffusers textual_inversion (fp16 weights, no ckpt)",
                                  prepare=diffusers_example_cast, generate=False))
    result = {"model": base or "sd15 random (stablesdg base build-random)", "resolution": resolution,
              "batch_size": batch, "steps": steps, "device": device, "machine": machine(),
              "note": "on CPU mixed precision is off (adapt trains fp32): a rehearsal, not a measurement"
              if device == "cpu" else "", "configs": records}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"{'config':<58}{'TI/s':>8}{'LoRA/s':>8}{'trial s':>9}{'img/s':>8}{'train GiB':>10}{'gen GiB':>9}")
    for r in records:
        click.echo(f"{r['config']:<58}{r['ti_steps_per_s']:>8}{r['lora_steps_per_s']:>8}"
                   f"{r.get('search_trial_s', '-')!s:>9}{r.get('img2img_images_per_s', '-')!s:>8}"
                   f"{r['train_peak_gib']!s:>10}{r.get('generate_peak_gib', '-')!s:>9}")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
