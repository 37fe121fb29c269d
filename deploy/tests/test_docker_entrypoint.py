"""Issue 14.6: the container refuses to start without a sha256 pin and a token, unless explicitly opted out.

Runs deploy/docker-entrypoint.sh itself (what the image's ENTRYPOINT runs) with the venv's stablesdg-line.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from processes import free_port
from test_server import wait_until_up

from stablesdg_line import sha256_hex

DEPLOY = Path(__file__).resolve().parents[1]
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"


def entrypoint_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_SHA256", "STABLESDG_LINE_TOKEN", "STABLESDG_LINE_INSECURE")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, **values}


def run_entrypoint(**values: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT)], env=entrypoint_env(**values), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("values", "named"), [
    ({}, "MODEL_SHA256 and STABLESDG_LINE_TOKEN not set"),
    ({"STABLESDG_LINE_TOKEN": "t"}, "MODEL_SHA256 not set"),
    ({"MODEL_SHA256": "0" * 64}, "STABLESDG_LINE_TOKEN not set"),
    ({"MODEL_SHA256": "", "STABLESDG_LINE_TOKEN": "t", "STABLESDG_LINE_INSECURE": "0"},
     "MODEL_SHA256 not set"),
])
def test_refuses_to_start_without_pin_and_token(rgb_model, values, named):
    result = run_entrypoint(MODEL_PATH=str(rgb_model), PORT=str(free_port()), **values)
    assert result.returncode == 2
    assert f"refusing to start: {named}" in result.stderr and "STABLESDG_LINE_INSECURE=1" in result.stderr


def test_pin_is_passed_on_a_tampered_model_is_refused(rgb_model, tmp_path):
    # Issue 14.6, the exact case: the old image loaded a tampered model and exited 0.
    tampered = tmp_path / "model.onnx"
    shutil.copy(rgb_model, tampered)
    with tampered.open("ab") as handle:
        handle.write(b"\x00")
    result = run_entrypoint(MODEL_PATH=str(tampered), PORT=str(free_port()), STABLESDG_LINE_TOKEN="t",
                            MODEL_SHA256=sha256_hex(rgb_model.read_bytes()))
    assert result.returncode == 2 and "refusing model" in result.stderr


def test_explicit_opt_out_starts_and_says_so(rgb_model):
    port = free_port()
    process = subprocess.Popen(["sh", str(ENTRYPOINT), "--max-concurrent", "1"],
                               env=entrypoint_env(MODEL_PATH=str(rgb_model), PORT=str(port),
                                                  STABLESDG_LINE_INSECURE="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            wait_until_up(http, process)
            assert http.get("/model").status_code == 200  # open, as asked
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    warning = b"WARNING: STABLESDG_LINE_INSECURE=1: starting without MODEL_SHA256 and STABLESDG_LINE_TOKEN"
    assert warning in output


def test_image_uses_the_entrypoint_and_has_no_empty_pin_default():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["sh", "/opt/stablesdg-line/docker-entrypoint.sh"]' in dockerfile
    assert "COPY docker-entrypoint.sh ./" in dockerfile and "WORKDIR /opt/stablesdg-line" in dockerfile
    assert 'MODEL_SHA256=""' not in dockerfile and "\nCMD " not in dockerfile
