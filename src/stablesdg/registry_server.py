"""The shared registry: `mlflow server` on PostgreSQL with proxied artifacts and MLflow's basic-auth app.

Nothing here serves HTTP itself: it writes basic-auth's configuration, builds the `mlflow server` command and
grants the plant's roles through MLflow's own auth REST API. Roles, as MLflow
permissions on the registered model:
- engineer: EDIT on the experiment and the registered model (log runs, register versions, set tags);
- approver: MANAGE on the registered model; the only non-admin who may move `champion` (registry_auth.py);
- line: nothing granted, so the server's default_permission READ.
The model is created by the admin here, BEFORE an engineer registers into it: MLflow gives the creator of a
registered model MANAGE, which would make that engineer an approver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RegistryError

AUTH_FUNCTION = "stablesdg.registry_auth:authenticate_and_guard_champion"
SERVER_ENV = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD")
USERS_CREATE, PERMISSIONS_GRANT = "/api/2.0/mlflow/users/create", "/api/3.0/mlflow/users/permissions/grant"
ROLES = ("engineer", "approver", "line")
ROLE_PERMISSIONS = {  # (experiment, registered model); None: the default (READ)
    "engineer": ("EDIT", "EDIT"),
    "approver": (None, "MANAGE"),
    "line": (None, None),
}


def auth_config(path: Path, auth_db_uri: str, admin_username: str = "admin", auth_cache_ttl_s: int = 0) -> Path:
    """basic-auth's ini: READ by default (line PCs), users in `auth_db_uri`, our champion guard.

    `auth_cache_ttl_s` > 0 turns on MLflow's credential cache: a (user, password) is hash-checked once per TTL
    per worker instead of on every request (benchmarks/bench_pull.py: the check is most of a pull's time), at
    the cost of a changed or deleted password staying valid on the other workers until the TTL ends. 0 (MLflow's
    default): no cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {auth_db_uri}",
        f"admin_username = {admin_username}",
        f"authorization_function = {AUTH_FUNCTION}",
        "grant_default_workspace_access = false",
        f"auth_cache_ttl_seconds = {auth_cache_ttl_s}",
        "",
    ]))
    return path


def server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                   port: int = 5000, workers: int = 2, mlflow_executable: str = "mlflow") -> list[str]:
    return [mlflow_executable, "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination, "--serve-artifacts",
            "--app-name", "basic-auth", "--host", host, "--port", str(port), "--workers", str(workers)]


def server_env(config: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `mlflow server` needs; the secrets come from the caller's environment, never a file."""
    env = dict(os.environ if base is None else base)
    missing = [name for name in SERVER_ENV if not env.get(name)]
    if missing:
        raise RegistryError(f"set {', '.join(missing)} in the environment before starting the registry "
                            "(the Flask secret key signs CSRF tokens; the admin password is used the first time)")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    return env


@dataclass
class Account:
    username: str
    role: str
    password: str = field(repr=False)


def setup_accounts(tracking_uri: str, model_name: str, experiment: str, accounts: list[Account]) -> dict[str, str]:
    """Create the experiment, the registered model and the users; grant each role its permissions.

    Runs as the admin (MLFLOW_TRACKING_USERNAME/PASSWORD). Idempotent: existing users keep their password.
    Returns {username: role}.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    creds = get_default_host_creds(tracking_uri)

    def call(endpoint: str, body: dict) -> None:  # the auth app's REST API, as its AuthServiceClient calls it;
        # importing that client loads the whole server (minutes on a busy 2-core PC)
        verify_rest_response(http_request(creds, endpoint, "POST", json=body), endpoint)

    client = MlflowClient(tracking_uri, tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for account in accounts:
        if account.role not in ROLES:
            raise RegistryError(f"account {account.username}: role {account.role!r} is not one of {ROLES}")
        try:
            call(USERS_CREATE, {"username": account.username, "password": account.password})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for resource_type, resource_id, permission in zip(
                ("experiment", "registered_model"), (experiment_id, model_name),
                ROLE_PERMISSIONS[account.role], strict=True):
            if permission is not None:
                call(PERMISSIONS_GRANT, {"username": account.username, "resource_type": resource_type,
                                         "resource_id": resource_id, "permission": permission})
    return {a.username: a.role for a in accounts}
