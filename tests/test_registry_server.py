"""The shared registry for real: PostgreSQL 15 + `mlflow server --app-name basic-auth`, three roles (the approver's
promotion through `stablesdg registry`: tests/commands/test_registry.py)."""

from __future__ import annotations

import json

from registry_services import ADMIN_PASSWORD, MODEL, http


def alias_body(version: str, alias: str = "champion") -> dict:
    return {"name": MODEL, "alias": alias, "version": version}


def test_engineer_registers_but_cannot_move_champion(registry, shared_version):
    status, text = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "erin",
                        registry.password("erin"), alias_body(shared_version))
    assert status == 403, text
    status, _ = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "erin",
                     registry.password("erin"), alias_body(shared_version, "challenger"))
    assert status == 200  # other aliases stay EDIT, as MLflow has them
    status, _ = http(registry, "DELETE", "/api/2.0/mlflow/registered-models/alias?name=" + MODEL + "&alias=champion",
                     "erin", registry.password("erin"))
    assert status == 403


def test_line_account_reads_but_cannot_write(registry, shared_version):
    status, text = http(registry, "GET", f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={shared_version}",
                        "line1", registry.password("line1"))
    assert status == 200 and json.loads(text)["model_version"]["version"] == shared_version
    status, _ = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "line1",
                     registry.password("line1"), alias_body(shared_version))
    assert status == 403
    status, _ = http(registry, "POST", "/api/2.0/mlflow/model-versions/set-tag", "line1",
                     registry.password("line1"), {"name": MODEL, "version": shared_version, "key": "k", "value": "v"})
    assert status == 403


def test_wrong_password_gets_no_data(registry, shared_version):
    status, text = http(registry, "GET", f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={shared_version}",
                        "line1", "wrong-password")
    assert status == 401
    assert MODEL not in text and "onnx_sha256" not in text


def test_artifacts_are_proxied_to_the_destination(registry, shared_version):
    assert list(registry.artifacts.rglob("classifier.onnx")), "the server stored no artifact under its destination"


def test_admin_is_the_bootstrap_user(registry):
    status, _ = http(registry, "GET", "/api/2.0/mlflow/users/current", "admin", ADMIN_PASSWORD)
    assert status in (200, 404)
