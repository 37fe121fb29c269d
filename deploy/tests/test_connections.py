"""Issue 24, class 2: connections bounded in time (head and body timeouts) and in number (a cap fitted to
RLIMIT_NOFILE), against a real `stablesdg-line serve` on 127.0.0.1 and real sockets."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from processes import cli_command, free_port, stop_process
from test_server import TOKEN, wait_until_up

from stablesdg_line.connections import FD_RESERVE

NOFILE = 1024  # the usual default soft limit, which 1100 idle connections used to exhaust
HEAD_TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 2.0


def limit_descriptors() -> None:
    """preexec_fn: the server child runs under RLIMIT_NOFILE 1024, soft and hard."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@contextlib.contextmanager
def serving(model, *flags: str, preexec_fn=None, env=None):
    port = free_port()
    command = cli_command("serve", str(model), "--port", str(port), "--token", TOKEN, *flags)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=preexec_fn, env=env)
    log: list[bytes] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until_up(http, process)
            lines = iter(process.stdout.readline, b"")
            drain = threading.Thread(target=lambda: log.extend(lines), daemon=True)
            drain.start()
            yield port, http, process, log
    finally:
        stop_process(process)
    assert b"Traceback" not in b"".join(log), b"".join(log).decode()[-3000:]


@pytest.fixture(scope="module")
def server(rgb_model):
    with serving(rgb_model, "--header-timeout", str(HEAD_TIMEOUT_S),
                 "--body-timeout", str(BODY_TIMEOUT_S)) as running:
        yield running


@pytest.fixture(scope="module")
def limited_server(rgb_model):
    """RLIMIT_NOFILE 1024, --limit-concurrency 2000 and the default timeouts (10 s head: the idle connections
    stay for the whole test): the cap must be fitted to the descriptors."""
    with serving(rgb_model, "--limit-concurrency", "2000", preexec_fn=limit_descriptors) as running:
        yield running


def dribble(port: int, head: bytes, trickle: bytes, every_s: float = 0.2,
            give_up_s: float = 15) -> tuple[bytes, float]:
    """Send `head`, then `trickle` one byte every `every_s` until the server answers or closes; returns the
    answer (b"" for a silent close) and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as sock:
        sock.sendall(head)
        sock.settimeout(every_s)
        answer = b""
        for byte in trickle:
            if time.monotonic() - started > give_up_s:
                break
            try:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer:
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(2)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
    return answer, time.monotonic() - started


def test_a_head_sent_slowly_is_cut_off_with_408(server):
    port, http, process, _ = server
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    answer, took = dribble(port, head, b"X-Slow: " + b"a" * 400)  # 80 s at this pace before the fix
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request head not received within 1 s" in answer
    assert HEAD_TIMEOUT_S <= took < HEAD_TIMEOUT_S + 4, took
    assert http.get("/health").status_code == 200 and process.poll() is None


def test_a_body_sent_slowly_is_cut_off_with_408(server):
    port, http, _, _ = server
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 4000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    answer, took = dribble(port, head, b"--b\r\n" + b"x" * 3000)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request body not received within 2 s" in answer
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 4, took
    assert http.get("/health").status_code == 200


def test_a_silent_connection_is_closed_after_the_head_timeout(server):
    port, _, _, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, nothing sent
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 4


def test_a_keep_alive_client_that_starts_a_second_head_slowly_is_cut_off(server):
    port, _, _, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'{"status":"ok"}' not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # cancels the keep-alive timer; the head timer still runs
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < HEAD_TIMEOUT_S + 4


def test_the_connection_cap_is_fitted_to_rlimit_nofile_and_logged(limited_server):
    _, _, _, log = limited_server
    expected = NOFILE - FD_RESERVE
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(b"open connections" in line for line in log):
        time.sleep(0.05)
    (line,) = [line.decode() for line in log if b"open connections" in line]
    assert f"at most {expected} open connections" in line and "RLIMIT_NOFILE 1024" in line, line


@pytest.mark.timeout(180)
def test_1100_idle_connections_do_not_stop_health_under_1024_descriptors(limited_server):
    port, http, process, log = limited_server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:  # this test process holds the client ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as fresh:
            answers = [fresh.get("/health").status_code for _ in range(5)]
        assert answers == [200] * 5, answers  # before the fix: accept() failed with EMFILE, no answer
        assert time.monotonic() - started < 5
        assert process.poll() is None
    finally:
        for sock in idle:
            sock.close()
    assert not any(b"Too many open files" in line for line in log), b"".join(log).decode()[-2000:]
    assert http.get("/health").status_code == 200


def test_when_every_connection_has_a_request_in_progress_a_new_one_gets_503(rgb_model):
    with serving(rgb_model, "--limit-concurrency", "3", "--body-timeout", "20") as (port, http, _, _):
        head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Length: 4000\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n"
                "--b\r\n").encode()
        busy = []
        try:
            for _ in range(3):  # three uploads in progress: their bodies never finish
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(head)
                busy.append(sock)
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                answer = extra.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503") and b"request in progress" in answer, answer[:200]
        finally:
            for sock in busy:
                sock.close()
        time.sleep(0.3)
        assert http.get("/health").status_code == 200  # the cap frees with the connections


# ----------------------------------------------------------------------------- upload spooling
UPLOAD_MB = 19


def spooled_bytes(pid: int, folder: Path) -> int:
    """Bytes in the server's open temporary files under `folder` (unnamed O_TMPFILE ones included)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(str(folder)):
                total += os.stat(fd).st_size
    return total


def multipart_upload(size: int) -> tuple[bytes, bytes]:
    part = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    body = part + os.urandom(size - len(part) - 8) + b"\r\n--b--\r\n"
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    return head, body


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while data := sock.recv(65536):
            answer += data
    return answer


@pytest.mark.timeout(180)
def test_ten_19_mb_uploads_at_once_spool_at_most_max_spool_mb(rgb_model, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    env = {**os.environ, "TMPDIR": str(spool)}
    flags = ("--max-upload-mb", "20", "--max-spool-mb", "64")
    with serving(rgb_model, *flags, env=env) as (port, _, process, _):
        head, body = multipart_upload(UPLOAD_MB * 2**20)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(10)]
        try:
            for sock in socks:
                sock.sendall(head)
            time.sleep(0.5)
            refused, accepted = [], []
            for sock in socks:  # the over-budget ones are answered before any byte of their body is sent
                sock.settimeout(0.5)
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    accepted.append(sock)
                    continue
                refused.append(answer)
            assert len(accepted) == 3 and len(refused) == 7, (len(accepted), refused[:1])
            assert all(a.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in a.lower()
                       and b"upload spool full" in a for a in refused), refused[0][:300]
            peak, answers = [0], []
            done = threading.Event()

            def watch_spool():
                while not done.is_set():
                    peak[0] = max(peak[0], spooled_bytes(process.pid, spool))
                    time.sleep(0.005)

            def send(sock):
                sock.settimeout(60)
                sock.sendall(body)
                answers.append(read_answer(sock))

            watcher = threading.Thread(target=watch_spool)
            watcher.start()
            senders = [threading.Thread(target=send, args=(sock,)) for sock in accepted]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join(120)
            done.set()
            watcher.join()
        finally:
            for sock in socks:
                sock.close()
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 422") for a in answers), answers
        assert all(b"not a recognised image" in a for a in answers)
        assert UPLOAD_MB * 2**20 <= peak[0] <= 64 * 2**20, peak[0] / 2**20  # before: 10 x 19 = 190 MB
        assert spooled_bytes(process.pid, spool) == 0  # every spool file is gone with its request


FIT_IN_CHILD = ("import resource, sys; from stablesdg_line.connections import fit_connection_cap; "
                "cap, why = fit_connection_cap(int(sys.argv[1])); "
                "print(cap, resource.getrlimit(resource.RLIMIT_NOFILE)[0], why)")


@pytest.mark.parametrize(("limits", "requested", "cap", "soft"), [
    ((512, 4096), 512, 512, 512 + FD_RESERVE),  # soft limit raised towards the hard one, as far as needed
    ((1024, 1024), 2000, 1024 - FD_RESERVE, 1024),  # no room to raise: the cap is lowered
    ((256, 256), 512, 64, 256),  # a tiny limit still leaves a quarter of it to connections
])
def test_the_cap_raises_the_soft_limit_when_it_can_or_is_lowered(limits, requested, cap, soft):
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    result = subprocess.run([sys.executable, "-c", FIT_IN_CHILD, str(requested)], capture_output=True,
                            text=True, timeout=60, preexec_fn=preexec, check=True)
    got_cap, got_soft, why = result.stdout.split(" ", 2)
    assert (int(got_cap), int(got_soft)) == (cap, soft), result.stdout
    assert f"at most {cap} open connections" in why
