"""Click pieces every command shares, one definition each: `--params`, `--class`, loading params.yaml, and the
translation of the library's domain errors into one-line CLI errors."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from ..config import ConfigError, Params, load_params
from ..errors import StableSDGError

F = TypeVar("F", bound=Callable[..., Any])

params_option = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="the pipeline's parameters file")
class_option = click.option("--class", "cls", required=True, help="the defect class (a key of `classes`)")


# The project layout, each path once: dvc.yaml's `cmd` passes every path a stage reads or writes explicitly;
# these are the defaults for a command run by hand.
DEMO = "data/demo"
PROCESSED = "data/processed"
SYNTHETIC = "data/synthetic"
ADAPTERS = "models/adapters"
FEATURE_NET = "models/feature_net"
SEARCH = "reports/search"
FID_METRICS = "metrics/fid.json"
FID_REPORT = "reports/evaluate/fid_per_class.json"
GRIDS = "reports/grids"


def path_option(*decls: str, default: str, help: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A path option (a `pathlib.Path` in the command) with a project-layout default."""
    return click.option(*decls, default=default, show_default=True, help=help,
                        type=click.Path(path_type=Path, **kwargs))


def load_or_exit(path: str) -> Params:
    """params.yaml parsed, or a one-line error naming the key and what is allowed; torch's CPU threads set from it."""
    try:
        params = load_params(path)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    set_threads(params.threads)
    return params


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count (`threads` in params.yaml), before a stage computes anything.

    A stage that computes with torch has imported it at module level, so its count is set directly. The stages that
    never touch torch (demo, ingest) must not pay for importing it: for them the count goes into OMP_NUM_THREADS,
    which torch reads when it is imported later, if ever."""
    if threads is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def load_for_class(path: str, cls: str) -> Params:
    """params.yaml parsed and `cls` checked against its classes."""
    params = load_or_exit(path)
    with domain_errors():
        params.class_config(cls)
    return params


@contextmanager
def domain_errors() -> Iterator[None]:
    """The library's domain errors as one-line CLI errors, without a traceback."""
    try:
        yield
    except StableSDGError as err:
        raise click.ClickException(str(err)) from None


def cli_errors(fn: F) -> F:
    """Decorator form of `domain_errors` for a command's body."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with domain_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
