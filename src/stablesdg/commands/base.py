"""`stablesdg base build-random`: a real-size Stable Diffusion folder with random weights, to check a setup (every
stage, `check-base`, memory and speed) before real weights are at hand."""

from __future__ import annotations

from pathlib import Path

import click

from ..basemodels import ARCHS, build_random_base
from ..stages.common import cli_errors


@click.group("base")
def base_group() -> None:
    """Base-model helpers (see README "Base model")."""


@base_group.command("build-random")
@click.option("--arch", type=click.Choice(sorted(ARCHS)), default="sd15", show_default=True,
              help="sd15: SD 1.5 (512 px, epsilon); sd21: SD 2.1 (768 px, v-prediction, OpenCLIP-H text encoder)")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@cli_errors
def build_random_command(arch: str, out: Path, seed: int) -> None:
    """Write a diffusers folder with ARCH's exact architecture, CLIP's real tokenizer, random fp16 weights."""
    build_random_base(arch, out, seed)
    click.echo(f"{arch} with random weights -> {out} (set model.base: {out}, model.resolution: "
               f"{ARCHS[arch].resolution}; then `stablesdg check-base`)")
