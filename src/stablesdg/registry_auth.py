"""Who may move the champion: MLflow basic-auth's authentication, plus one rule it does not have.

MLflow 3's basic-auth lets anyone with EDIT on a registered model set or delete ANY alias
(`SetRegisteredModelAlias` is checked with `can_update`). A plant needs engineers who register versions
(EDIT) but cannot move `champion`. This module is plugged in as basic-auth's `authorization_function`
(see `registry_server.auth_config`): it authenticates exactly like MLflow's own function, then refuses a
set/delete of a protected alias (`champion`, `previous-champion`) unless the caller holds MANAGE on that
registered model (or is an admin). Every other decision stays MLflow's.
"""

from __future__ import annotations

from flask import Response, g, request
from mlflow.server import auth as mlflow_auth

PROTECTED_ALIASES = frozenset({"champion", "previous-champion"})
ALIAS_PATH_SUFFIX = "/mlflow/registered-models/alias"


def _alias_request() -> tuple[str, str] | None:
    """(model name, alias) when this request sets or deletes an alias, else None."""
    if not request.path.endswith(ALIAS_PATH_SUFFIX) or request.method not in ("POST", "DELETE"):
        return None
    body = request.get_json(silent=True) or {}
    name, alias = body.get("name") or request.args.get("name"), body.get("alias") or request.args.get("alias")
    return (str(name), str(alias)) if name and alias else None


def authenticate_and_guard_champion() -> mlflow_auth.Authorization | Response:
    authorization = mlflow_auth.authenticate_request_basic_auth()
    if not isinstance(authorization, mlflow_auth.Authorization) or g.get("_stablesdg_in_guard"):
        return authorization
    target = _alias_request()
    if target is None or target[1] not in PROTECTED_ALIASES:
        return authorization
    g._stablesdg_in_guard = True  # MLflow's permission lookup authenticates again: do not recurse
    try:
        if mlflow_auth.sender_is_admin() or mlflow_auth._get_registered_model_permission(target[0]).can_manage:
            return authorization
    finally:
        g._stablesdg_in_guard = False
    return Response(f"Permission denied: moving alias '{target[1]}' of '{target[0]}' needs MANAGE on the "
                    "registered model (the approver)", status=403)
