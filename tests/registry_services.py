"""Real services for the shared-registry tests: a throwaway PostgreSQL 15 cluster and `mlflow server` with
basic-auth on 127.0.0.1, both in a temp folder, both stopped at the end.

initdb refuses root, so as root the cluster runs as the `postgres` system user (`runuser`).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from stablesdg.registry_server import Account, auth_config, server_command, server_env, setup_accounts

ADMIN_PASSWORD = "admin-Secret-1234"
MODEL = "steel-classifier"
EXPERIMENT = "plant"
ACCOUNTS = [Account("erin", "engineer", "erin-Pass-1234"), Account("ada", "approver", "ada-Pass-1234"),
            Account("line1", "line", "line1-Pass-1234")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent  # type: ignore[arg-type]
    pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql-15")


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port; yields the base URI `postgresql://user@127.0.0.1:PORT`.

    Its folder is a fresh /tmp one (pytest's tmp is private to root, where the postgres user cannot enter)."""
    bin_dir, port = pg_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="stablesdg-pg-"))
    data = root / "pgdata"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(_as_pg_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
                                "-E", "UTF8"]), **run)  # type: ignore[call-overload]
    subprocess.run(_as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w",
                                "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]), **run)  # type: ignore[call-overload]
    try:
        for db in ("mlflow", "mlflow_auth"):
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db], **run)  # type: ignore[call-overload]
        yield f"postgresql://{user}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Registry:
    uri: str
    backend_uri: str
    artifacts: Path
    process: subprocess.Popen
    log: Path

    def env(self, username: str, password: str) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": password}

    def password(self, username: str) -> str:
        return next(a.password for a in ACCOUNTS if a.username == username)


def wait_healthy(uri: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


def start_server(root: Path, pg_uri: str, port: int | None = None, auth_cache_ttl_s: int = 0) -> Registry:
    port = port or free_port()
    config = auth_config(root / "basic_auth.ini", f"{pg_uri}/mlflow_auth", auth_cache_ttl_s=auth_cache_ttl_s)
    env = server_env(config, {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
                              "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD})
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    log = root / f"mlflow-server-{port}.log"
    cmd = server_command(f"{pg_uri}/mlflow", str(root / "artifacts"), port=port, workers=1,
                         mlflow_executable=str(Path(sys.executable).parent / "mlflow"))
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(uri, process, log)
    return Registry(uri, f"{pg_uri}/mlflow", root / "artifacts", process, log)


def stop_server(registry: Registry) -> None:
    if registry.process.poll() is None:
        os.killpg(registry.process.pid, 15)
        try:
            registry.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(registry.process.pid, 9)
            registry.process.wait(timeout=30)


def setup_plant(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin creates the experiment, the model and the three accounts."""
    with monkeypatch.context() as m:
        for key, value in registry.env("admin", ADMIN_PASSWORD).items():
            m.setenv(key, value)
        setup_accounts(registry.uri, MODEL, EXPERIMENT, ACCOUNTS)


@contextmanager
def plant_registry(root: Path, auth_cache_ttl_s: int = 0) -> Iterator[Registry]:
    """PostgreSQL + the server + the plant's accounts, all stopped at the end."""
    with postgres() as pg_uri:
        server = start_server(root, pg_uri, auth_cache_ttl_s=auth_cache_ttl_s)
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


def set_alias(registry, user: str, version: str, alias: str = "champion") -> int:
    status, _ = http(registry, "POST", "/api/2.0/mlflow/registered-models/alias", user, registry.password(user),
                     {"name": MODEL, "alias": alias, "version": version})
    return status
