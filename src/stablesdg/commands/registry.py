"""`stablesdg registry list|show|promote|rollback`: inspect the classifier registry and move the champion."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from ..registry import client, list_versions, promote, rollback
from ..registry_server import Account, auth_config, server_command, server_env, setup_accounts
from ..stages.common import cli_errors, load_or_exit, params_option
from ..tracking import tracking_uri


def _name(params_path: str, name: str | None) -> str:
    if name:
        return name
    return load_or_exit(params_path).tracking.registered_model


def _registry_command(fn: Callable) -> Callable:
    fn = cli_errors(fn)
    fn = params_option(fn)
    return click.option("--name", default=None, help="Registered model (default: tracking.registered_model).")(fn)


@click.group("registry")
def registry_group() -> None:
    """Inspect the classifier registry and move the champion (promote, rollback) with a recorded reason."""


@registry_group.command("list")
@_registry_command
def list_command(params_path: str, name: str | None) -> None:
    """Versions with their test metrics and aliases."""
    name = _name(params_path, name)
    rows = list_versions(client(), name)
    if not rows:
        click.echo(f"{name}: no versions yet (run `stablesdg train`)")
        return
    click.echo(f"{'ver':>4}  {'aliases':<28} {'variant':<20} {'acc':>8} {'macroF1':>8} {'gainF1':>9}  test_set")
    for r in rows:
        click.echo(f"{r['version']:>4}  {','.join(r['aliases']) or '-':<28} {r['variant']:<20} "
                   f"{r['test_accuracy'][:8]:>8} {r['test_macro_f1'][:8]:>8} {r['gain_macro_f1'][:9]:>9}  "
                   f"{r['test_set']}")


@registry_group.command("show")
@click.argument("version")
@_registry_command
def show_command(version: str, params_path: str, name: str | None) -> None:
    """One version: aliases, tags and the reviewer description."""
    name = _name(params_path, name)
    mv = client().get_model_version(name, version)
    click.echo(json.dumps({"name": name, "version": mv.version, "aliases": list(mv.aliases), "run_id": mv.run_id,
                           "source": mv.source, "tags": dict(sorted(mv.tags.items()))}, indent=2))
    if mv.description:
        click.echo("\n" + mv.description)


@registry_group.command("promote")
@click.argument("version")
@click.option("--reason", required=True, help="Why (recorded as the version's promotion_reason tag).")
@click.option("--force", is_flag=True,
              help="Promote without a model card or on another test set than the champion's (tagged forced_promotion).")
@_registry_command
def promote_command(version: str, reason: str, force: bool, params_path: str, name: str | None) -> None:
    """Make VERSION the champion; the old champion becomes previous-champion.

    Refused for a version without a model card, or tested on another test set than the champion's, unless
    --force (the reason is then recorded as the forced_promotion tag).
    """
    name = _name(params_path, name)
    old = promote(client(), name, version, reason, force)
    click.echo(f"{name}: v{version} is champion" + (f" (v{old} is previous-champion)" if old else ""))


@registry_group.command("rollback")
@click.option("--reason", required=True, help="Why (recorded as rollback_reason / rolled_back_reason tags).")
@click.option("--to", "to_version", default=None, help="Version to restore (default: previous-champion).")
@_registry_command
def rollback_command(reason: str, to_version: str | None, params_path: str, name: str | None) -> None:
    """Put the previous champion (or --to VERSION) back as champion."""
    name = _name(params_path, name)
    old, new = rollback(client(), name, reason, to_version)
    click.echo(f"{name}: champion v{old} -> v{new} (v{old} is previous-champion)")


@registry_group.command("serve")
@click.option("--backend-store-uri", required=True, help="postgresql://USER@HOST:PORT/mlflow (runs, registry).")
@click.option("--auth-db-uri", required=True, help="postgresql://USER@HOST:PORT/mlflow_auth (users, permissions).")
@click.option("--artifacts-destination", required=True, help="Folder or s3:// bucket the server proxies.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("basic_auth.ini"), show_default=True, help="Where to write basic-auth's ini.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--auth-cache-ttl", type=click.IntRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="basic-auth's credential cache (0: off, MLflow's default): a password is hash-checked once per "
                   "TTL per worker, not on every request (a pull: 2.7 s -> 0.85 s, benchmarks/bench_pull.py); a "
                   "changed password stays valid on other workers until the TTL ends.")
@cli_errors
def serve_command(backend_store_uri: str, auth_db_uri: str, artifacts_destination: str, config_path: Path,
                  host: str, port: int, workers: int, auth_cache_ttl: int) -> None:
    """Run the shared registry: `mlflow server --app-name basic-auth` on PostgreSQL with proxied artifacts.

    Needs MLFLOW_FLASK_SERVER_SECRET_KEY and (first start) MLFLOW_AUTH_ADMIN_PASSWORD in the environment."""
    config = auth_config(config_path, auth_db_uri, auth_cache_ttl_s=auth_cache_ttl)
    env = server_env(config)
    cmd = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    click.echo(f"registry: {' '.join(cmd)} (auth config {config})")
    os.execvpe(cmd[0], cmd, env)


@registry_group.command("accounts")
@click.option("--experiment", default=None, help="Experiment engineers log to (default: tracking.experiment).")
@click.option("--user", "users", multiple=True, required=True, metavar="ROLE:NAME",
              help="engineer:NAME, approver:NAME or line:NAME; the password is read from $STABLESDG_PASSWORD_NAME.")
@_registry_command
def accounts_command(experiment: str | None, users: tuple[str, ...], params_path: str, name: str | None) -> None:
    """As the admin (MLFLOW_TRACKING_USERNAME/PASSWORD): create the model, the users, and grant the roles."""
    params = load_or_exit(params_path)
    name = name or params.tracking.registered_model
    accounts = []
    for spec in users:
        role, _, username = spec.partition(":")
        variable = f"STABLESDG_PASSWORD_{username.upper().replace('-', '_')}"
        if not os.environ.get(variable):
            raise click.UsageError(f"--user {spec}: set ${variable} to the account's password")
        accounts.append(Account(username, role, os.environ[variable]))
    roles = setup_accounts(tracking_uri(), name, experiment or params.tracking.experiment, accounts)
    for username, role in roles.items():
        click.echo(f"{username}: {role}")
