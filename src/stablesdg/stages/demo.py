"""Stage `demo`: the procedural NEU-style demo set, the pipeline's embedded default data."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..demo import TEXTURES, write_demo_dataset
from .common import DEMO, load_or_exit, params_option, path_option


@click.command("demo")
@params_option
@path_option("--out", default=DEMO, file_okay=False)
def demo_command(params_path: str, out: Path) -> None:
    """Write the procedural NEU-style demo set (its six classes, class-per-folder layout).

    The demo set is always the same six classes, whatever `classes` lists: with your own data.source and
    classes, this stage stays harmless and ingest reads your folder.
    """
    params = load_or_exit(params_path)
    if out.exists():
        shutil.rmtree(out)
    n = write_demo_dataset(out, list(TEXTURES), params.data.demo.per_class, params.data.demo.size, params.seed)
    click.echo(f"demo: wrote {n} images to {out}")
