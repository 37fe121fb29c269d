"""Stage `ingest`: data.source normalised into the processed folder (manifest, splits), quarantine report,
contact sheet and the data metrics."""

from __future__ import annotations

from pathlib import Path

import click
import mlflow

from .. import tracking
from ..data import contact_sheet, data_metrics, ingest
from ..utils import write_json
from .common import PROCESSED, cli_errors, load_or_exit, params_option, path_option


@click.command("ingest")
@params_option
@path_option("--out", default=PROCESSED, file_okay=False)
@path_option("--reports", default="reports/data", file_okay=False)
@path_option("--metrics", default="metrics/data.json", dir_okay=False)
@cli_errors
def ingest_command(params_path: str, out: Path, reports: Path, metrics: Path) -> None:
    """Normalise data.source into data/processed with a manifest, a split and a quarantine report."""
    params = load_or_exit(params_path)
    summary = ingest(Path(params.data.source), out, params.data, params.class_names, params.seed)
    write_json(reports / "quarantine.json", {"count": summary["quarantined"], "files": summary["rejected"]})
    counts = {k: v for k, v in summary.items() if k != "rejected"}
    write_json(reports / "summary.json", counts)  # layout, source, per-class split counts
    write_json(metrics, data_metrics(summary))
    sheet = contact_sheet(out, params.class_names)
    sheet.save(reports / "contact_sheet.png")
    with tracking.stage_run("ingest", params, inputs=[params.data.source]):
        mlflow.log_metrics({"images": summary["images"], "quarantined": summary["quarantined"]})
        mlflow.log_artifact(str(reports / "quarantine.json"))
        mlflow.log_artifact(str(reports / "contact_sheet.png"))
        mlflow.log_artifact(str(out / "manifest.csv"))
    click.echo(
        f"ingest: {summary['images']} images ({summary['layout']} layout), "
        f"{summary['quarantined']} quarantined -> {reports / 'quarantine.json'}"
    )
