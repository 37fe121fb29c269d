"""The shared registry for real: PostgreSQL 15 + `mlflow server --app-name basic-auth`, three roles."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from registry_services import ADMIN_PASSWORD, EXPERIMENT, MODEL, postgres, setup_plant, start_server, stop_server


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with postgres() as pg_uri:
        server = start_server(root, pg_uri)
        try:
            with pytest.MonkeyPatch.context() as m:
                setup_plant(server, m)
            yield server
        finally:
            stop_server(server)


def http(registry, method: str, path: str, user: str, password: str, body: dict | None = None):
    """(status, parsed body) of one REST call with basic auth."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{registry.uri}{path}", data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def publish(registry, monkeypatch, onnx_file: Path, macro_f1: float, commit: str) -> str:
    """As the engineer: one run with the ONNX (as `export` logs it) and a registered version tagged like export."""
    import mlflow
    from mlflow import MlflowClient

    for key, value in registry.env("erin", registry.password("erin")).items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(registry.uri)
    mlflow.set_registry_uri(registry.uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="export") as run:
        mlflow.log_artifact(str(onnx_file), artifact_path="onnx")
    client = MlflowClient(registry.uri, registry.uri)
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    mv = client.create_model_version(MODEL, f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id, tags={
        "onnx_sha256": digest, "onnx_export_run_id": run.info.run_id, "test_macro_f1": repr(macro_f1),
        "git_commit": commit})
    return str(mv.version)


@pytest.fixture
def version(registry, monkeypatch, tmp_path) -> str:
    model = tmp_path / "classifier.onnx"
    model.write_bytes(b"not really onnx, the registry does not care")
    return publish(registry, monkeypatch, model, 0.9, "a" * 40)


def alias_body(version: str, alias: str = "champion") -> dict:
    return {"name": MODEL, "alias": alias, "version": version}


def test_engineer_registers_but_cannot_move_champion(registry, version):
    status, text = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "erin",
                        registry.password("erin"), alias_body(version))
    assert status == 403, text
    status, _ = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "erin",
                     registry.password("erin"), alias_body(version, "challenger"))
    assert status == 200  # other aliases stay EDIT, as MLflow has them
    status, _ = http(registry, "DELETE", "/api/2.0/mlflow/registered-models/alias?name=" + MODEL + "&alias=champion",
                     "erin", registry.password("erin"))
    assert status == 403


def test_line_account_reads_but_cannot_write(registry, version):
    status, text = http(registry, "GET", f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={version}",
                        "line1", registry.password("line1"))
    assert status == 200 and json.loads(text)["model_version"]["version"] == version
    status, _ = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", "line1",
                     registry.password("line1"), alias_body(version))
    assert status == 403
    status, _ = http(registry, "POST", "/api/2.0/mlflow/model-versions/set-tag", "line1",
                     registry.password("line1"), {"name": MODEL, "version": version, "key": "k", "value": "v"})
    assert status == 403


def test_wrong_password_gets_no_data(registry, version):
    status, text = http(registry, "GET", f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={version}",
                        "line1", "wrong-password")
    assert status == 401
    assert MODEL not in text and "onnx_sha256" not in text


def test_approver_promotes_through_the_cli(registry, version, monkeypatch):
    from stablesdg.cli import main

    for key, value in registry.env("ada", registry.password("ada")).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["registry", "promote", version, "--name", MODEL, "--force",
                                       "--reason", "approved in review"])
    assert result.exit_code == 0, result.output
    status, text = http(registry, "GET", f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion",
                        "line1", registry.password("line1"))
    assert status == 200 and json.loads(text)["model_version"]["version"] == version


def test_artifacts_are_proxied_to_the_destination(registry, version):
    assert list(registry.artifacts.rglob("classifier.onnx")), "the server stored no artifact under its destination"


def test_admin_is_the_bootstrap_user(registry):
    status, _ = http(registry, "GET", "/api/2.0/mlflow/users/current", "admin", ADMIN_PASSWORD)
    assert status in (200, 404)
