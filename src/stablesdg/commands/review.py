"""`stablesdg data review-import REVIEW_DIR`: labelled images from a line's review folder into data.source
(the library side is review_import.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..review_import import import_reviewed, labelled_from_csv, labelled_from_folders
from ..stages.common import cli_errors, load_or_exit, params_option, path_option
from ..utils import write_json


@click.command("review-import")
@click.argument("review_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns image,label (image: a file name in REVIEW_DIR); without it, the images "
                   "sorted into REVIEW_DIR/<class>/ are imported")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path),
              help="the class-per-folder source to add to (default: data.source in params.yaml)")
@click.option("--allow-test", is_flag=True,
              help="let ingest put these images in any split, the test split included (default: training only)")
@path_option("--report", default="reports/data/review_import.json", dir_okay=False)
@params_option
@cli_errors
def review_import_command(review_dir: Path, labels: Path | None, source: Path | None, allow_test: bool,
                          report: Path, params_path: str) -> None:
    """Add the labelled images of a line's review folder to the DVC-tracked source folder."""
    params = load_or_exit(params_path)
    source = source or Path(params.data.source)
    items = labelled_from_csv(review_dir, labels) if labels else labelled_from_folders(review_dir)
    summary = import_reviewed(items, source, params.class_names, allow_test)
    write_json(report, summary.to_dict())
    for refused in summary.refused:
        click.echo(f"refused {refused['file']}: {refused['reason']}", err=True)
    click.echo(f"review-import: {len(summary.added)} added to {source}, {len(summary.refused)} refused "
               f"-> {report}")
    if summary.added:
        click.echo(f"next: dvc add {source} && git add {source}.dvc && dvc repro")
