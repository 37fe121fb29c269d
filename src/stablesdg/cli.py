"""`stablesdg` command line: one small sub-command per pipeline stage (what dvc.yaml runs)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from .options import load_or_exit, params_option


class LazyGroup(click.Group):
    """Imports a stage's module only when that stage runs: `stablesdg data ...` never loads diffusers."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


LAZY_COMMANDS = {
    "adapt": "stablesdg.adaptation:adapt_command",
    "generate": "stablesdg.generation:generate_command",
    "search": "stablesdg.search:search_command",
    "evaluate": "stablesdg.search:evaluate_command",
    "train": "stablesdg.classifier:train_command",
    "registry": "stablesdg.registry:registry_group",
    "export": "stablesdg.export:export_command",
    "ablation": "stablesdg.ablation:ablation_command",
    "prior": "stablesdg.prior:prior_group",
    "pretrain": "stablesdg.pretrain:pretrain_group",
    "recognition": "stablesdg.recognition:recognition_command",
    "features": "stablesdg.metrics:features_command",
    "provenance": "stablesdg.provenance:provenance_command",
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@click.version_option(package_name="stablesdg")
def main() -> None:
    """StableSDG: few-shot steel-defect image generation, FID-guided, tracked and shipped as ONNX.

    STABLESDG_THREADS sets torch's CPU thread count (e.g. 1 when other jobs share the cores).
    """
    threads = os.environ.get("STABLESDG_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


@main.group()
def data() -> None:
    """Dataset stages: the embedded demo set and the ingest of any supported layout."""


@data.command("demo")
@params_option
@click.option("--out", default="data/demo", show_default=True, type=click.Path(file_okay=False))
def data_demo(params_path: str, out: str) -> None:
    """Write the procedural NEU-style demo set (its six classes, class-per-folder layout).

    The demo set is always the same six classes, whatever `classes` lists: with your own data.source and
    classes, this stage stays harmless and ingest reads your folder.
    """
    import shutil

    from .demo import TEXTURES, write_demo_dataset

    params = load_or_exit(params_path)
    out_dir = Path(out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    n = write_demo_dataset(out_dir, list(TEXTURES), params.data.demo.per_class, params.data.demo.size, params.seed)
    click.echo(f"demo: wrote {n} images to {out_dir}")


@data.command("ingest")
@params_option
@click.option("--out", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--reports", default="reports/data", show_default=True, type=click.Path(file_okay=False))
def data_ingest(params_path: str, out: str, reports: str) -> None:
    """Normalise data.source into data/processed with a manifest, a split and a quarantine report."""
    from . import tracking
    from .data import DataError, contact_sheet, data_metrics, ingest
    from .utils import write_json

    params = load_or_exit(params_path)
    try:
        summary = ingest(Path(params.data.source), Path(out), params.data, params.class_names, params.seed)
    except DataError as err:
        raise click.ClickException(str(err)) from None
    reports_dir = Path(reports)
    write_json(reports_dir / "quarantine.json", {"count": summary["quarantined"], "files": summary["rejected"]})
    counts = {k: v for k, v in summary.items() if k != "rejected"}
    write_json(reports_dir / "summary.json", counts)  # layout, source, per-class split counts
    write_json(Path("metrics/data.json"), data_metrics(summary))
    sheet = contact_sheet(Path(out), params.class_names)
    sheet.save(reports_dir / "contact_sheet.png")
    with tracking.stage_run("ingest", params, inputs=[params.data.source]) as _run:
        import mlflow

        mlflow.log_metrics({"images": summary["images"], "quarantined": summary["quarantined"]})
        mlflow.log_artifact(str(reports_dir / "quarantine.json"))
        mlflow.log_artifact(str(reports_dir / "contact_sheet.png"))
        mlflow.log_artifact(str(Path(out) / "manifest.csv"))
    click.echo(
        f"ingest: {summary['images']} images ({summary['layout']} layout), "
        f"{summary['quarantined']} quarantined -> {reports_dir / 'quarantine.json'}"
    )


if __name__ == "__main__":
    sys.exit(main())
