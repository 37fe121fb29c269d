"""`stablesdg-line pull` against the real shared registry: the line PC follows `champion`."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from registry_services import MODEL, free_port, publish, set_alias
from stablesdg_line.pull import PullError, RegistryClient, follow, pull, rollback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "tests"))
from onnx_models import write_conv_model  # noqa: E402


def line_client(registry) -> RegistryClient:
    return RegistryClient(registry.uri, "line1", registry.password("line1"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def two_versions(registry, monkeypatch, tmp_path):
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
    v1_file, v2_file = write_conv_model(tmp_path / "v1" / "classifier.onnx", seed=1), \
        write_conv_model(tmp_path / "v2" / "classifier.onnx", seed=2)
    v1 = publish(registry, monkeypatch, v1_file, 0.81, "1" * 40)
    v2 = publish(registry, monkeypatch, v2_file, 0.87, "2" * 40)
    assert set_alias(registry, "ada", v1) == 200
    return (v1, v1_file), (v2, v2_file)


def test_promote_v2_line_switches_and_rollback_restores_v1(registry, two_versions, tmp_path):
    (v1, v1_file), (v2, v2_file) = two_versions
    dest = tmp_path / "line"
    first = pull(line_client(registry), MODEL, "champion", dest)
    assert first.changed and first.after.version == v1 and sha(dest / "current.onnx") == sha(v1_file)
    assert not pull(line_client(registry), MODEL, "champion", dest).changed  # same champion: nothing moves

    assert set_alias(registry, "ada", v2) == 200
    switched = pull(line_client(registry), MODEL, "champion", dest)
    assert (switched.before.version, switched.after.version) == (v1, v2)
    assert "commit 111111111111, test macro-F1 0.8100" in switched.summary()
    assert "commit 222222222222, test macro-F1 0.8700" in switched.summary()
    assert (dest / "current.onnx").read_bytes() == v2_file.read_bytes()
    assert (dest / "previous.onnx").read_bytes() == v1_file.read_bytes()

    back = rollback(dest)
    assert back.after.version == v1
    assert (dest / "current.onnx").read_bytes() == v1_file.read_bytes()  # byte for byte


def test_tampered_artifact_is_refused(registry, two_versions, tmp_path):
    (v1, v1_file), (v2, _) = two_versions
    dest = tmp_path / "line"
    pull(line_client(registry), MODEL, "champion", dest)
    stored = [p for p in registry.artifacts.rglob("classifier.onnx") if sha(p) == sha(two_versions[1][1])]
    assert stored, "v2's artifact not found under the server's artifact destination"
    for path in stored:  # every version made from the same seed has these bytes: edit each copy, not one at random
        path.write_bytes(path.read_bytes() + b"\0")  # someone edits the file behind the registry
    assert set_alias(registry, "ada", v2) == 200
    with pytest.raises(PullError, match="tampered"):
        pull(line_client(registry), MODEL, "champion", dest)
    assert sha(dest / "current.onnx") == sha(v1_file) and not (dest / ".incoming.onnx").exists()


def test_model_failing_load_checks_is_refused(registry, monkeypatch, tmp_path):
    junk = tmp_path / "junk" / "classifier.onnx"
    junk.parent.mkdir()
    junk.write_bytes(b"not an onnx graph")  # its sha256 tag is right: only the load checks can refuse it
    version = publish(registry, monkeypatch, junk, 0.99, "3" * 40)
    assert set_alias(registry, "ada", version, alias="candidate") == 200
    with pytest.raises(PullError, match="load checks"):
        pull(line_client(registry), MODEL, "candidate", tmp_path / "line")
    assert not (tmp_path / "line" / "current.onnx").exists()


def test_server_down_line_keeps_its_model(registry, two_versions, tmp_path, caplog):
    (_, v1_file), _ = two_versions
    dest = tmp_path / "line"
    pull(line_client(registry), MODEL, "champion", dest)
    down = RegistryClient(f"http://127.0.0.1:{free_port()}", "line1", "x", timeout=2)
    follow(down, MODEL, "champion", dest, every_s=0.01, rounds=2)  # logs, never raises
    assert "unreachable" in caplog.text
    assert sha(dest / "current.onnx") == sha(v1_file)


def test_wrong_password_pulls_nothing(registry, two_versions, tmp_path):
    with pytest.raises(PullError, match="HTTP 401"):
        pull(RegistryClient(registry.uri, "line1", "wrong"), MODEL, "champion", tmp_path / "line")
    assert not (tmp_path / "line" / "current.onnx").exists()
