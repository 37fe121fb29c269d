"""Adaptation steps/s and generated images/s: the tiny/embedded model on CPU, an SD-1.5-sized one on a GPU.

    python benchmarks/bench_diffusion.py                 # model.base from params.yaml (embedded/tiny), CPU
    python benchmarks/bench_diffusion.py --sd15-size     # randomly initialised SD-1.5-sized model (GPU)

Writes benchmarks/results/diffusion[_sd15].json and prints a table.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sd15_folder(tmp: Path) -> Path:
    """SD 1.5's exact architecture and CLIP's real tokenizer, random fp16 weights (`stablesdg base build-random`)."""
    from stablesdg.basemodels import build_random_base

    return build_random_base("sd15", tmp / "sd15")


def run(params, processed: Path, tmp: Path, steps: int, n_images: int, prepare=None) -> dict:
    from stablesdg.adaptation import AdaptRun, class_data, enable_cuda_speedups
    from stablesdg.diffusion import load_base_pipeline
    from stablesdg.generation import render
    from stablesdg.utils import pick_device

    cls = params.class_names[0]
    params.adapt.embedding.steps = params.adapt.lora.steps = steps
    params.adapt.checkpoint_every = 10**6
    device = pick_device(params.adapt.device)
    t0 = time.perf_counter()
    pipe = load_base_pipeline(params.model, device)
    enable_cuda_speedups(pipe, params.adapt, device)
    if prepare is not None:  # a benchmark's own change to the loaded pipeline (e.g. diffusers' example casts)
        prepare(pipe)
    times = {"load_s": time.perf_counter() - t0}
    stamps: dict[str, list[float]] = {"embedding": [], "lora": []}

    def on_step(stage: str, step: int, loss: float) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps[stage].append(time.perf_counter())

    run_ = AdaptRun(params, class_data(params, processed, cls), tmp / "adapters", tmp / "ckpt", device,
                    on_step=on_step)
    run_.run(pipe)
    for stage, ts in stamps.items():  # from the end of step 1: the first step pays one-off warm-up costs
        times[f"{stage}_steps_per_s"] = (len(ts) - 1) / (ts[-1] - ts[0])
    from stablesdg.data import split_paths

    sources = (split_paths(processed, cls, "train") * n_images)[:n_images]
    g = params.generate
    if pick_device(g.device) == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    render(pipe, params, cls, sources, g.strength, g.guidance_scale, g.steps, seeds=list(range(n_images)))
    if pick_device(g.device) == "cuda":
        torch.cuda.synchronize()
    times["generated_images_per_s"] = n_images / (time.perf_counter() - t0)
    return times


@click.command()
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--sd15-size", is_flag=True, help="randomly initialised SD-1.5-sized model (meant for a GPU)")
@click.option("--steps", default=20, show_default=True)
@click.option("--images", "n_images", default=16, show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results"), show_default=True)
def main(params_path: str, sd15_size: bool, steps: int, n_images: int, out: str) -> None:
    from conftest import make_processed

    from stablesdg.config import load_params

    params = load_params(params_path)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        size = 512 if sd15_size else params.data.image_size
        processed = make_processed(tmp / "data", params.class_names[:2], per_class=8, size=size)
        if sd15_size:
            params.model.base, params.model.resolution = str(sd15_folder(tmp)), 512
            params.data.image_size = 512
        result = {"model": params.model.base, "resolution": params.model.resolution,
                  "batch_size": params.adapt.lora.batch_size, "adapt_steps_per_stage": steps, "generate_steps": params.generate.steps,
                  "strength": params.generate.strength, "machine": machine(),
                  **run(params, processed, tmp, steps, n_images)}
    path = Path(out) / ("diffusion_sd15.json" if sd15_size else "diffusion.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"{'metric':<28}{'value':>12}")
    for key in ("load_s", "embedding_steps_per_s", "lora_steps_per_s", "generated_images_per_s"):
        click.echo(f"{key:<28}{result[key]:>12.3f}")
    click.echo(f"-> {path}")


if __name__ == "__main__":
    main()
