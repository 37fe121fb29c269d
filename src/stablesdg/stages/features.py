"""Stage `features`: check the FID/KID feature network's weights and record which one this run uses."""

from __future__ import annotations

from pathlib import Path

import click
import mlflow

from .. import tracking
from ..metrics import NET_RECORD, feature_net_record
from ..utils import write_json
from .common import FEATURE_NET, cli_errors, load_or_exit, params_option, path_option


@click.command("features")
@params_option
@path_option("--out", default=FEATURE_NET)
@cli_errors
def features_command(params_path: str, out: Path) -> None:
    """Check the FID/KID feature network's weights and record which one this run uses."""
    params = load_or_exit(params_path)
    with tracking.stage_run("features", params, inputs=[]):
        record = feature_net_record(params.metrics)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / NET_RECORD, record)
        mlflow.log_artifact(str(out / NET_RECORD))
    click.echo(f"features: {record['feature_net']} ({record['weights']}) -> {out / NET_RECORD}")
