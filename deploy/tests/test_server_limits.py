"""Issue 14, items 1-3: the upload limit holds on bytes received, pixels and slots are budgeted, formats are
allowed by content. Real uvicorn process on 127.0.0.1 where framing matters, real ASGI app otherwise."""

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import threading
import time

import httpx
import pytest
from corpus import RED, image_bytes
from fastapi.testclient import TestClient
from PIL import Image
from processes import cli_command, free_port
from test_server import TOKEN, upload, wait_until_up

from stablesdg_line import Classifier, ImageRejected, load_image
from stablesdg_line.server import Busy, ServeConfig, WorkLimiter, create_app

LIMIT = 64 * 1024
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture(scope="module")
def server(rgb_model):
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(rgb_model), "--port", str(port), "--token", TOKEN,
                                           "--max-upload-mb", str(LIMIT / 2**20)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until_up(http, process)
            yield port, http, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def raw_request(port: int, head: bytes, body_chunks, total_limit_s: float = 10) -> tuple[bytes, int]:
    """Send head then body chunks until the server answers or closes; returns (response, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=total_limit_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        response = b""
        deadline = time.monotonic() + total_limit_s
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError):
                response += sock.recv(65536)
            if response or time.monotonic() > deadline:
                break
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, TimeoutError):
            pass
    return response, sent


def chunked_body(megabytes: int):
    block = b"x" * (1 << 20)
    for _ in range(megabytes):
        yield b"%x\r\n" % len(block) + block + b"\r\n"
        time.sleep(0.001)


def test_content_length_plus_chunked_200_mb_is_refused_before_reading(server):
    # Issue 14.1, the exact probe: Content-Length: 100 and Transfer-Encoding: chunked, then 200 MB.
    port, http, _ = server
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    started = time.monotonic()
    response, sent = raw_request(port, head, chunked_body(200))
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert b"conflicting Content-Length and Transfer-Encoding" in response
    assert sent < 50 * 2**20 and time.monotonic() - started < 10
    assert http.get("/health").status_code == 200


def test_chunked_over_size_without_length_is_refused(server):
    port, http, _ = server
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    response, sent = raw_request(port, head, chunked_body(200))
    assert response.startswith(b"HTTP/1.1 411"), response[:200]
    assert sent < 50 * 2**20
    assert http.get("/health").status_code == 200


def test_body_is_counted_on_bytes_received_whatever_the_headers_say(rgb_model):
    # Defence in depth below the header checks: a server that framed the body differently from the declared
    # Content-Length would still be cut off at the limit, and the rest of the body is never pulled.
    app = create_app(Classifier(rgb_model), ServeConfig(max_upload_bytes=LIMIT))
    pulled, sent = [], []
    scope = {"type": "http", "method": "POST", "path": "/classify", "raw_path": b"/classify",
             "query_string": b"",
             "headers": [(b"content-length", b"100"), (b"content-type", b"multipart/form-data; boundary=b")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "root_path": "", "app": app}

    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'

    async def receive():  # a well-formed multipart part whose file data never ends (200 MB)
        pulled.append(1)
        body = part if len(pulled) == 1 else b"y" * 16384
        return {"type": "http.request", "body": body, "more_body": len(pulled) < 12800}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and b"counted on the bytes received" in body
    assert len(pulled) * 16384 <= LIMIT + 2 * 16384  # stopped at the limit, not after 200 MB


def big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def png_6300():
    return big_png(6300)  # 39.7 MP, 39 kB: issue 14.2's small-upload, large-decode file


def test_request_pixel_budget_refuses_before_decoding(rgb_model, png_6300):
    app = create_app(Classifier(rgb_model), ServeConfig(max_upload_bytes=2**22))
    with TestClient(app) as client:
        started = time.monotonic()
        response = client.post("/classify", files=upload(*[(f"{i}.png", png_6300) for i in range(8)]))
        elapsed = time.monotonic() - started
        assert response.status_code == 413, response.text
        assert "above the per-request budget of 64000000" in response.json()["detail"]
        assert elapsed < 0.4 * 8 / 2  # refused from the headers: far less than decoding 8 x 40 MP
        one = client.post("/classify", files=upload(("one.png", png_6300)))
        assert one.status_code == 200 and one.json()["results"][0]["class"] is not None


def test_small_budget_counts_every_file_of_the_request(rgb_model):
    app = create_app(Classifier(rgb_model), ServeConfig(max_request_pixels=5000))
    square = image_bytes(RED, size=(48, 48))  # 2304 pixels
    with TestClient(app) as client:
        assert client.post("/classify", files=upload(("a.png", square), ("b.png", square))).status_code == 200
        three = client.post("/classify", files=upload(*[(f"{i}.png", square) for i in range(3)]))
        assert three.status_code == 413 and "6912 pixels" in three.json()["detail"]


def test_busy_server_answers_503_with_retry_after_instead_of_queueing_forever(rgb_model):
    app = create_app(Classifier(rgb_model), ServeConfig(max_concurrent=1, max_waiting=0, queue_timeout_s=0.1))
    with TestClient(app) as client, app.state.limiter.slot():  # the only slot is held by "another request"
        response = client.post("/classify", files=upload(("r.png", image_bytes(RED))))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "busy" in response.json()["detail"]
    with TestClient(app) as client:  # slot free again: served
        assert client.post("/classify", files=upload(("r.png", image_bytes(RED)))).status_code == 200


def test_limiter_queues_up_to_max_waiting_then_refuses():
    limiter = WorkLimiter(slots=1, max_waiting=1, timeout_s=5)
    holder_in, release = threading.Event(), threading.Event()
    waited = []

    def hold():
        with limiter.slot():
            holder_in.set()
            release.wait(5)

    def wait_for_slot():
        with limiter.slot():
            waited.append(True)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    holder_in.wait(5)
    threads.append(threading.Thread(target=wait_for_slot))
    threads[1].start()
    deadline = time.monotonic() + 5
    while limiter._waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Busy, match="1 requests are already waiting"), limiter.slot():
        pass
    release.set()
    for thread in threads:
        thread.join(5)
    assert waited == [True]


def test_eps_is_refused_by_content_whatever_its_name(rgb_model, tmp_path):
    # Issue 14.3: Pillow on its own opens this as EPS (and would start Ghostscript to render it).
    assert Image.open(io.BytesIO(EPS)).format == "EPS"
    with pytest.raises(ImageRejected, match="not a recognised image format .allowed by content: png, jpeg"):
        load_image(EPS)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(gif, "GIF")
    app = create_app(Classifier(rgb_model))
    with TestClient(app) as client:
        response = client.post("/classify", files=upload(("x.png", EPS), ("y.jpg", gif.getvalue()),
                                                         ("ok.png", image_bytes(RED))))
    rows = response.json()["results"]
    assert response.status_code == 422 and [r["class"] for r in rows] == [None, None, "red_defect"]
    assert all("not a recognised image format" in r["error"] for r in rows[:2])
    webp = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(webp, "WEBP", lossless=True)
    assert load_image(webp.getvalue()).format == "WEBP"  # the five listed formats still decode
    assert json.loads(json.dumps(rows))  # and the answer stays valid JSON
