"""Issue 22: which generation lever gives the synthetic set back its fine detail? Judged before any classifier.

For every class of a finished NEU run (its params.yaml, data/processed, models/adapters, reports/search), each
lever renders the same images (same train sources, same seeds) at the class's searched strength and guidance
and scores them against the class's held-out real images (val + pool, the search's reference; the test split
stays for the classifier): FID / KID on the surface net, `detail_ratio` (1 = as much fine detail as real), and
how close they are to the k train images (novelty: 1 = as far as a held-out real image; the median SSIM to the
nearest train image: 1 = a copy).

A lever is `SAMPLER:STEPS[@STRENGTH][/RESOLUTION]`, e.g. `ddim:10` (the pipeline's search grid today),
`ddpm:50`, `euler_ancestral:25@0.8`, `ddim:10/200` (denoise at 200 px instead of the prior's 128). Results are cached per (class, lever) in OUT/generation_levers.json, so a rerun adds
levers without re-rendering; OUT/generation_levers.md is the table, and a grid per class shows one source
image across levers.

    python experiments/generation_levers.py --run /path/to/neu/workspace --levers ddim:10,ddim:50,ddpm:50
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from stablesdg.config import load_params
from stablesdg.data import heldout_paths, split_paths
from stablesdg.evaluation import closeness
from stablesdg.generation import generation_resolution, load_adapted_pipeline, render
from stablesdg.metrics import detail_ratio, load_image, load_scorer, mean_detail_energy
from stablesdg.search import cycled, seeds_for
from stablesdg.utils import read_json
from stablesdg.viz import image_grid, save_image


def parse_lever(text: str, searched_strength: float) -> tuple[str, int, float, int | None]:
    """`SAMPLER:STEPS[@STRENGTH][/RESOLUTION]` -> (sampler, steps, strength, resolution or None = params')."""
    text, _, resolution = text.partition("/")
    sampler_steps, _, strength = text.partition("@")
    sampler, steps = sampler_steps.split(":")
    return sampler, int(steps), float(strength) if strength else searched_strength, \
        int(resolution) if resolution else None


def markdown(results: dict, levers: list[str], classes: list[str], fid_key: str) -> str:
    head = "| lever | " + " | ".join(classes) + " | mean |"
    lines = ["# Generation levers (NEU-CLS k = 10, held-out real images as reference)", "",
             f"Each cell: {fid_key} / detail_ratio.", "", head, "|---|" + "---:|" * (len(classes) + 1)]
    for lever in levers:
        cells = [results.get(f"{cls}|{lever}") for cls in classes]
        if any(c is None for c in cells):
            continue
        fids, details = [c[fid_key] for c in cells], [c["detail_ratio"] for c in cells]
        lines.append(f"| {lever} | " + " | ".join(f"{f:.1f} / {d:.2f}" for f, d in zip(fids, details, strict=True))
                     + f" | {np.mean(fids):.1f} / {np.mean(details):.2f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--levers", required=True, help="comma-separated SAMPLER:STEPS[@STRENGTH]")
@click.option("--images", default=24, show_default=True, help="images per class and lever")
@click.option("--classes", default=None, help="comma-separated subset (default: every class)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/neu/k10"))
@click.option("--threads", default=2, show_default=True)
def main(run_dir: Path, levers: str, images: int, classes: str | None, out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    params = load_params(run_dir / "params.yaml")
    processed = run_dir / "data" / "processed"
    names = classes.split(",") if classes else list(params.classes)
    lever_list = levers.split(",")
    cache_file = out / "generation_levers.json"
    results = read_json(cache_file)["results"] if cache_file.exists() else {}
    scorer = load_scorer(params.metrics, params.seed)
    fid_key = scorer.keys["fid"]
    for cls in names:
        todo = [lv for lv in lever_list if f"{cls}|{lv}" not in results]
        if not todo:
            continue
        best = read_json(run_dir / "reports" / "search" / f"{cls}.json")["best"]
        pipe = load_adapted_pipeline(params.model, cls, run_dir / "models" / "adapters" / cls)
        real = heldout_paths(processed, cls)
        real_energy = mean_detail_energy(real)
        sources = cycled(split_paths(processed, cls, "train"), images)
        seeds = seeds_for(params.seed, cls, "levers", images)
        rows, labels = [[load_image(p).convert("RGB") for p in sources[:6]]], ["real (the sources)"]
        for lever in todo:
            sampler, steps, strength, resolution = parse_lever(lever, float(best["strength"]))
            at = dataclasses.replace(params, generate=dataclasses.replace(
                params.generate, resolution=resolution or params.generate.resolution))
            start = time.perf_counter()
            fake = render(pipe, at, cls, sources, strength, float(best["guidance_scale"]), steps, seeds,
                          scheduler=sampler)
            seconds = time.perf_counter() - start
            results[f"{cls}|{lever}"] = {**scorer.score(real, fake), **closeness(scorer, processed, cls, fake),
                                         "detail_ratio": detail_ratio(real, fake, real_energy),
                                         "strength": strength, "guidance_scale": best["guidance_scale"],
                                         "sampler": sampler, "steps": steps,
                                         "resolution": generation_resolution(at.generate, at.model),
                                         "seconds": round(seconds, 1)}
            print(cls, lever, {k: round(v, 3) for k, v in results[f"{cls}|{lever}"].items()
                               if isinstance(v, float)}, flush=True)
            rows.append([img.convert("RGB") for img in fake[:6]])
            labels.append(lever)
            out.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps({"run": str(run_dir), "images": images, "results": results}, indent=2))
        (out / "grids").mkdir(parents=True, exist_ok=True)
        save_image(image_grid(rows, labels), out / "grids" / f"{cls}_levers.png")
    (out / "generation_levers.md").write_text(markdown(results, lever_list, list(params.classes), fid_key))
    print((out / "generation_levers.md").read_text())


if __name__ == "__main__":
    main()
