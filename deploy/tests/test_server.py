"""HTTP service: valid uploads classified, malformed/oversized/unauthorised refused, service stays up."""

import subprocess
import time

import httpx
import pytest
from corpus import BLUE, GREEN, RED, image_bytes, write_malformed_corpus
from fastapi.testclient import TestClient
from processes import cli_command, free_port, stop_process

from stablesdg_line import Classifier, sha256_hex
from stablesdg_line.server import ServeConfig, create_app

TOKEN = "line-7-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def client(rgb_model):
    config = ServeConfig(token=TOKEN, max_upload_bytes=MAX_UPLOAD, max_files=16)
    app = create_app(Classifier(rgb_model), config)
    with TestClient(app) as test_client:
        yield test_client


def upload(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def test_health_needs_no_token(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_endpoint_reports_version_sha_and_metadata(client, rgb_model):
    body = client.get("/model", headers=AUTH).json()
    assert body["sha256"] == sha256_hex(rgb_model.read_bytes())
    assert body["model_version"] == "7"
    assert body["class_names"] == ["red_defect", "green_defect", "blue_defect"]
    assert body["metadata"]["input_size"] == "[8, 8]" and "path" not in body


def test_classify_one_and_several_files(client):
    single = client.post("/classify", headers=AUTH, files=upload(("r.png", image_bytes(RED))))
    assert single.status_code == 200
    assert [r["class"] for r in single.json()["results"]] == ["red_defect"]
    several = client.post("/classify", headers=AUTH, files=upload(
        ("g.jpg", image_bytes(GREEN, "JPEG")), ("b.bmp", image_bytes(BLUE, "BMP"))))
    body = several.json()
    assert several.status_code == 200 and body["failed"] == 0 and body["model_version"] == "7"
    assert [(r["file"], r["class"]) for r in body["results"]] == [("g.jpg", "green_defect"),
                                                                   ("b.bmp", "blue_defect")]
    assert body["results"][0]["scores"]["green_defect"] == body["results"][0]["confidence"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_unauthorised_requests_get_401(client, headers):
    for response in (client.get("/model", headers=headers),
                     client.post("/classify", headers=headers, files=upload(("r.png", image_bytes(RED))))):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200


def test_malformed_uploads_get_422_with_per_file_reasons(client, tmp_path):
    reasons = write_malformed_corpus(tmp_path)
    files = [(name, (tmp_path / name).read_bytes()) for name in reasons if name.endswith((".png", ".jpg"))]
    response = client.post("/classify", headers=AUTH, files=upload(("good.png", image_bytes(RED)), *files))
    body = response.json()
    assert response.status_code == 422 and body["failed"] == len(files)
    assert body["results"][0]["class"] == "red_defect"  # the good file in the same request still counts
    for row in body["results"][1:]:
        assert row["class"] is None and reasons[row["file"]] in row["error"], row
    assert client.get("/health").status_code == 200


def test_request_without_files_or_not_multipart_is_422(client):
    assert client.post("/classify", headers=AUTH, data={"x": "1"}).status_code == 422
    as_json = {**AUTH, "Content-Type": "application/json"}
    assert client.post("/classify", headers=as_json, content=b"{}").status_code == 422


def test_oversized_upload_gets_413_and_service_stays_up(client):
    big = image_bytes(RED, "BMP", size=(200, 200))  # ~120 kB > 64 kB limit
    response = client.post("/classify", headers=AUTH, files=upload(("big.bmp", big)))
    assert response.status_code == 413
    too_many = upload(*[(f"{i}.png", image_bytes(RED, size=(4, 4))) for i in range(17)])
    assert client.post("/classify", headers=AUTH, files=too_many).status_code == 413
    chunked = client.post("/classify", headers=AUTH, content=iter([b"--x\r\n"]))
    assert chunked.status_code == 411
    assert client.get("/health").status_code == 200


def test_real_uvicorn_server_process(rgb_model):
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(rgb_model), "--port", str(port), "--token", TOKEN,
                                           "--max-upload-mb", "0.0625"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            wait_until_up(http, process)
            ok = http.post("/classify", headers=AUTH, files=upload(("b.png", image_bytes(BLUE))))
            assert ok.status_code == 200 and ok.json()["results"][0]["class"] == "blue_defect"
            assert http.post("/classify", files=upload(("b.png", image_bytes(BLUE)))).status_code == 401
            bad = http.post("/classify", headers=AUTH, files=upload(("t.png", b"text pretending to be png")))
            assert bad.status_code == 422
            big = image_bytes(RED, "BMP", size=(200, 200))
            assert http.post("/classify", headers=AUTH, files=upload(("big.bmp", big))).status_code == 413
            assert http.get("/health").json() == {"status": "ok"}
            assert "server" not in http.get("/health").headers
    finally:
        stop_process(process)
    assert process.returncode is not None


def wait_until_up(http: httpx.Client, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.stdout.read().decode()}")
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")
