"""Click pieces every stage command shares: one definition each (the commands import these, never `cli`)."""

from __future__ import annotations

import click

from .config import ConfigError, Params, load_params

params_option = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="the pipeline's parameters file")


def load_or_exit(path: str) -> Params:
    """params.yaml parsed, or a one-line error naming the key and what is allowed."""
    try:
        return load_params(path)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
