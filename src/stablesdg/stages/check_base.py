"""Stage `check-base`: the base model's preflight (files, architecture, initializers, memory, device), before any
training. It always runs (DVC `always_changed`) and writes the fingerprint of the files diffusers loads:
adapt / search / generate depend on that file, so new weights in the same folder re-run them, and nothing else
(a multi-GB checkpoint beside the diffusers folders) is hashed."""

from __future__ import annotations

from pathlib import Path

import click

from ..preflight import check_base, fingerprint_record, render_report
from ..utils import write_json
from .common import load_or_exit, params_option


@click.command("check-base")
@params_option
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the base model's fingerprint here (the DVC stage's output)")
def check_base_command(params_path: str, out: Path | None) -> None:
    """Check model.base before training: complete folder, architecture, initializer words, memory, device."""
    params = load_or_exit(params_path)
    report = check_base(params)
    click.echo(render_report(report))
    if report.problems:
        raise SystemExit(1)
    if out is not None:
        write_json(out, fingerprint_record(report))
