"""Stage `generate@<class>`: the class's synthetic set, img2img from its real train images with the adapted
model and the searched settings."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..generation import generate_class, generation_resolution
from ..preflight import require_base
from .common import (
    ADAPTERS,
    PROCESSED,
    SEARCH,
    SYNTHETIC,
    class_option,
    cli_errors,
    load_for_class,
    params_option,
    path_option,
)


@click.command("generate")
@class_option
@params_option
@path_option("--processed", default=PROCESSED)
@path_option("--adapters", default=ADAPTERS)
@path_option("--search", "search_dir", default=SEARCH)
@path_option("--out", default=SYNTHETIC)
@cli_errors
def generate_command(cls: str, params_path: str, processed: Path, adapters: Path, search_dir: Path,
                     out: Path) -> None:
    """Synthetic images for one class from its real training images (img2img) with the adapted model."""
    params = load_for_class(params_path, cls)
    require_base(params, [])  # check-base's file checks: a missing file stops here, before any loading
    if generation_resolution(params.generate, params.model) < params.model.resolution:
        click.echo(f"warning: generate.resolution {params.generate.resolution} is below model.resolution "
                   f"{params.model.resolution}: images lose detail (set generate.resolution: null)", err=True)
    torch.manual_seed(params.seed)
    summary = generate_class(params, cls, processed, adapters / cls, out / cls, search_dir / f"{cls}.json")
    s = summary["settings"]
    click.echo(f"generate {cls}: {summary['images']} images ({s['mode']}, strength {s['strength']}, "
               f"guidance {s['guidance_scale']}, steps {s['steps']}, from {summary['settings_from']}) -> {out / cls}")
