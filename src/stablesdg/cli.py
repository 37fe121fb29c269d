"""`stablesdg` command line: assembles the stage commands (one module per dvc.yaml stage in `stages/`) and the
other commands (`commands/`) into one group. Nothing else happens here."""

from __future__ import annotations

import importlib
import sys

import click

from .stages.common import domain_errors


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs: `stablesdg data ...` never loads diffusers."""

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

    def invoke(self, ctx: click.Context):
        with domain_errors():  # also for commands that do not translate the library's errors themselves
            return super().invoke(ctx)


DATA_COMMANDS = {
    "demo": "stablesdg.stages.demo:demo_command",
    "ingest": "stablesdg.stages.ingest:ingest_command",
    "review-import": "stablesdg.commands.review:review_import_command",
}
LAZY_COMMANDS = {
    # dvc.yaml stages
    "check-base": "stablesdg.stages.check_base:check_base_command",
    "adapt": "stablesdg.stages.adapt:adapt_command",
    "features": "stablesdg.stages.features:features_command",
    "search": "stablesdg.stages.search:search_command",
    "generate": "stablesdg.stages.generate:generate_command",
    "evaluate": "stablesdg.stages.evaluate:evaluate_command",
    "train": "stablesdg.stages.train:train_command",
    "export": "stablesdg.stages.export:export_command",
    # other commands
    "base": "stablesdg.commands.base:base_group",
    "registry": "stablesdg.commands.registry:registry_group",
    "ablation": "stablesdg.commands.ablation:ablation_command",
    "pretrain": "stablesdg.commands.pretrain:pretrain_group",
    "provenance": "stablesdg.commands.provenance:provenance_command",
    "prior": "stablesdg.commands.prior:prior_group",
    "recognition": "stablesdg.commands.recognition:recognition_command",
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@click.version_option(package_name="stablesdg")
def main() -> None:
    """StableSDG: few-shot steel-defect image generation, FID-guided, tracked and shipped as ONNX.

    Every stage sets torch's CPU thread count from `threads` in params.yaml (e.g. 1 when other jobs share the cores).
    """


@main.group(cls=LazyGroup, lazy=DATA_COMMANDS)
def data() -> None:
    """Dataset stages: the embedded demo set (`demo`) and the ingest of any supported layout (`ingest`);
    `review-import` adds the images a line was unsure of, once labelled, to the source folder."""


if __name__ == "__main__":
    sys.exit(main())
