"""`stablesdg registry`: list and show a sqlite store's versions, clear errors for a refused promotion or rollback,
and an approver's promotion on the shared registry (PostgreSQL + basic-auth, conftest `registry`)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import REGISTRY_NAME, invoke, log_and_register, run_cli
from registry_services import MODEL, http

from stablesdg.commands.registry import registry_group


def test_list_and_show_name_the_champion_and_its_reason(registry_trained, mlflow_store):
    params, splits, _, model = registry_trained
    _, registered = log_and_register(model, splits, params, "real_only")
    rows = invoke(registry_group, ["list", "--name", REGISTRY_NAME]).splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["1"] and "champion" in rows[0]
    shown = invoke(registry_group, ["show", "1", "--name", REGISTRY_NAME])
    assert '"champion"' in shown and registered.reason in shown


def test_cli_errors_are_clear(registry_trained, mlflow_store, tmp_path):
    params, splits, _, model = registry_trained
    log_and_register(model, splits, params, "real_only")
    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    out = run_cli(["stablesdg", "registry", "promote", "1", "--reason", "x", "--name", REGISTRY_NAME], tmp_path, env,
                  check=False)
    assert out.returncode != 0 and "already the champion" in out.stderr
    out = run_cli(["stablesdg", "registry", "rollback", "--reason", "x", "--name", REGISTRY_NAME], tmp_path, env,
                  check=False)
    assert out.returncode != 0 and "previous-champion" in out.stderr


def test_approver_promotes_through_the_cli(registry, shared_version, monkeypatch):
    for key, value in registry.env("ada", registry.password("ada")).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(registry_group, ["promote", shared_version, "--name", MODEL, "--force",
                                                 "--reason", "approved in review"])
    assert result.exit_code == 0, result.output
    status, text = http(registry, "GET", f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion",
                        "line1", registry.password("line1"))
    assert status == 200 and json.loads(text)["model_version"]["version"] == shared_version
