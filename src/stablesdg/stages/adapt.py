"""Stage `adapt@<class>`: textual inversion, then LoRA, on one class's k-shot images, in an MLflow run.

Several GPUs: `accelerate launch --num_processes N -m stablesdg.cli adapt --class C` runs N data-parallel
replicas; only the main process writes the adapter files, the loss curve and the MLflow run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import mlflow
from PIL import Image

from .. import tracking
from ..adaptation import AdaptRun, ClassData, prepare_adaptation
from ..adaptation_state import process_state
from ..config import Params
from ..generation import render
from ..preflight import require_base
from ..utils import derive_seed
from ..viz import image_grid
from .common import ADAPTERS, PROCESSED, class_option, cli_errors, load_for_class, params_option, path_option


def write_loss_csv(path: Path, losses: list[tuple[int, str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "stage", "loss"])
        offset = max((s for s, st, _ in losses if st == "embedding"), default=0)
        for step, stage, loss in losses:  # one x axis across both stages for the DVC plot
            writer.writerow([step + (offset if stage == "lora" else 0), stage, f"{loss:.6f}"])


def adapt_grid(pipe, params: Params, data: ClassData) -> Image.Image:
    """Real training images over images the adapted model makes from them (adapt.sample_images of each)."""
    sources = data.files[:params.adapt.sample_images]
    fakes = render(pipe, params, data.name, sources, strength=params.generate.strength,
                   guidance_scale=params.generate.guidance_scale, steps=params.generate.steps,
                   seeds=[derive_seed(params.seed, data.name, "grid", i) for i in range(len(sources))])
    return image_grid([[Image.open(p) for p in sources], fakes], ["real", "generated"])


def tracked_run(run: AdaptRun, pipe, reports: Path, inputs: list[Path]) -> dict | None:
    """`run` inside an MLflow run: per-step losses, the adapter files and a real-vs-generated grid."""
    cls = run.data.name
    with tracking.stage_run("adapt", run.params, inputs=inputs, run_name=f"adapt-{cls}",
                            extra_tags={"class": cls}):
        run.on_step = lambda stage, step, loss: mlflow.log_metric(f"loss_{stage}", loss, step=step)
        record = run.run(pipe)
        if record:
            write_loss_csv(reports / f"{cls}_loss.csv", run.losses)
            mlflow.log_artifacts(str(run.out_dir), artifact_path="adapter")
            if run.params.adapt.sample_images:  # at real size on a CPU the grid cost more than the training
                tracking.log_image(adapt_grid(pipe, run.params, run.data), f"grids/{cls}_real_vs_generated.png")
    return record


@click.command("adapt")
@class_option
@params_option
@path_option("--processed", default=PROCESSED)
@path_option("--out", default=ADAPTERS)
@path_option("--reports", default="reports/adapt")
@path_option("--checkpoints", default=".cache/adapt", help="resumable checkpoints (outside DVC)")
@cli_errors
def adapt_command(cls: str, params_path: str, processed: Path, out: Path, reports: Path, checkpoints: Path) -> None:
    """Textual inversion, then LoRA (U-Net + text encoder) on the class's k-shot images."""
    params = load_for_class(params_path, cls)
    require_base(params, [cls])  # check-base's checks: a two-token initializer stops here, not after loading
    pipe, run = prepare_adaptation(params, cls, processed, out, checkpoints)
    dist = process_state()
    record = tracked_run(run, pipe, reports, [processed / "images" / cls]) if dist.is_main_process else run.run(pipe)
    dist.wait_for_everyone()
    if record is None:  # a non-main process under `accelerate launch`: the main one saved and reports
        return
    click.echo(f"adapt {cls}: embedding loss {record['final_loss']['embedding']}, "
               f"lora loss {record['final_loss']['lora']} -> {out / cls}")
