"""The standing bad-input corpus (issue 14) through `classify`, `watch` and HTTP, in real processes.

Every case must give a clear per-file error naming the problem, no process may crash, and every valid file in
the same batch / folder / request must still be classified. Ingest runs the same corpus in
tests/test_ingest_corpus.py (main suite). The model-metadata cases run through every command here too.
"""

import json
import subprocess
from dataclasses import replace

import httpx
import pytest
from badinputs import (
    assert_clean,
    corpus_summary,
    drop_file_permission_override,
    malformed_bytes,
    valid_unusual,
    write_corpus,
)
from onnx_models import RGB, write_model
from processes import cli_command, free_port
from test_server import TOKEN, upload, wait_until_up
from test_watch import rows_by_name

from stablesdg_line.cli import EXIT_MODEL_REFUSED, EXIT_SOME_FILES_FAILED, main

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=60,
                          preexec_fn=drop_file_permission_override)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    cases, valid = write_corpus(folder)
    assert len(cases) >= 32 + 40  # issue 14's 32 cases, and issue 24's hostile headers and odd names
    return folder, cases, valid


def outcomes_of(rows: dict[str, list[dict]]) -> dict[str, list[str | None]]:
    return {name: [row["error"] for row in got] for name, got in rows.items()}


def test_classify_gives_every_bad_file_its_error_and_classifies_the_rest(rgb_model, corpus, tmp_path):
    folder, cases, valid = corpus
    out = tmp_path / "out.jsonl"
    names = sorted([c.name for c in cases] + valid)
    result = run_unprivileged("classify", str(rgb_model), *[str(folder / n) for n in names],
                              "--output", str(out), "--batch-size", "7")
    crashes = int(result.returncode != EXIT_SOME_FILES_FAILED) + int("Traceback" in result.stderr)
    rows: dict[str, list[dict]] = {}
    for row in map(json.loads, out.read_text().splitlines()):
        rows.setdefault(row["file"].rsplit("/", 1)[-1], []).append(row)
    summary = corpus_summary(cases, valid, outcomes_of(rows), crashes, lambda case: case.line)
    print(json.dumps(summary, indent=1))
    assert_clean(summary, refused=len(cases))
    assert sorted(rows) == names
    for name in valid:
        assert rows[name][0]["class"] in RGB.class_names, rows[name]


def test_watch_rejects_or_ignores_every_bad_file_and_keeps_the_valid_ones(rgb_model, corpus, tmp_path):
    folder, cases, valid = corpus
    rejected, results = tmp_path / "rejected", tmp_path / "results.jsonl"
    result = run_unprivileged("-v", "watch", str(rgb_model), str(folder), "--results", str(results),
                              "--rejected-dir", str(rejected), "--once", "--settle-seconds", "0.05",
                              "--incomplete-grace-seconds", "0")
    crashes = int(result.returncode != 0) + int("Traceback" in result.stderr)
    rows = rows_by_name(results)
    summary = corpus_summary(cases, valid, outcomes_of(rows), crashes,
                             lambda case: None if case.watch == "ignored" else case.watch or case.line)
    print(json.dumps(summary, indent=1))
    ignored = [case for case in cases if case.watch == "ignored"]
    assert_clean(summary, refused=len(cases) - len(ignored))
    for case in cases:
        if case.watch == "ignored":
            assert case.name not in rows and f"ignoring {case.name}: " in result.stderr
            continue
        (row,) = rows[case.name]
        assert row["rejected_to"] == str(rejected / case.name) and (rejected / case.name).exists()
    for name in valid:
        (row,) = rows[name]
        assert row["class"] in RGB.class_names and (folder / name).exists(), row


@pytest.fixture(scope="module")
def server(rgb_model):
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(rgb_model), "--port", str(port), "--token", TOKEN,
                                           "--max-upload-mb", "5", "--max-files", "24"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until_up(http, process)
            yield port, http, process
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert b"Traceback" not in output, output.decode()[-3000:]


def test_http_gives_every_bad_upload_its_error_next_to_a_valid_one(server):
    from badinputs import Case

    port, http, process = server
    good = valid_unusual()["ok_rgb.png"]
    outcomes: dict[str, list[str | None]] = {}
    crashes = 0
    cases = [Case(name, line, ingest) for name, (_, line, ingest) in malformed_bytes().items()]
    for name, (data, _, _) in malformed_bytes().items():
        response = http.post("/classify", headers=AUTH, files=upload(("good.png", good), (name, data)))
        crashes += response.status_code >= 500
        first, second = response.json()["results"]
        assert response.status_code == 422 and first["class"] in RGB.class_names, (name, response.text)
        outcomes[name] = [second["error"]]
    unusual = http.post("/classify", headers=AUTH, files=upload(*valid_unusual().items()))
    outcomes.update({row["file"]: [row["error"]] for row in unusual.json()["results"]})
    summary = corpus_summary(cases, sorted(valid_unusual()), outcomes, crashes, lambda case: case.line)
    print(json.dumps(summary, indent=1))
    assert_clean(summary, refused=len(cases))
    assert unusual.status_code == 200 and unusual.json()["failed"] == 0
    assert process.poll() is None and http.get("/health").status_code == 200


def raw_exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    return response


def test_http_request_level_cases_are_refused_and_the_server_stays_up(server):
    port, http, process = server
    post = f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    multipart = "Content-Type: multipart/form-data; boundary=b\r\n"
    cases = {
        "content-length + chunked": (
            post + multipart + "Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        "chunked without length": (post + multipart + "Transfer-Encoding: chunked\r\n\r\n", b"411"),
        "declared over-size": (post + multipart + f"Content-Length: {6 * 2**20}\r\n\r\n", b"413"),
        "no content-length": (post + multipart + "\r\n", b"411"),
    }
    for label, (head, status) in cases.items():
        response = raw_exchange(port, head.encode())
        assert response.split(b" ")[1] == status, (label, response[:300])
    square = valid_unusual()["ok_rgb.png"]
    assert http.post("/classify", headers=AUTH,
                     files=upload(*[(f"{i}.png", square) for i in range(25)])).status_code == 413
    assert http.post("/classify", headers=AUTH, data={"x": "1"}).status_code == 422
    assert http.post("/classify", headers={**AUTH, "Content-Type": "application/json"},
                     content=b"{}").status_code == 422
    assert http.post("/classify", files=upload(("a.png", square))).status_code == 401
    assert process.poll() is None and http.get("/health").status_code == 200


BAD_METADATA = {
    "nan_mean": {"mean": "[NaN, 0.5, 0.5]"},
    "inf_mean": {"mean": "[Infinity, 0.5, 0.5]"},
    "tiny_std": {"std": "[1e-45, 0.5, 0.5]"},
    "zero_std": {"std": "[0.0, 0.5, 0.5]"},
    "duplicate_classes": {"class_names": json.dumps(["red_defect", "red_defect", "blue_defect"])},
    "huge_input_size": {"input_size": "[100000, 100000]"},
    "class_names_not_json": {"class_names": "red,green,blue"},
    "bad_channel_mode": {"channel_mode": "CMYK"},
}


@pytest.mark.parametrize("label", sorted(BAD_METADATA))
def test_bad_model_metadata_is_refused_by_every_command(tmp_path, capsys, label):
    model = write_model(replace(RGB, metadata_overrides=BAD_METADATA[label], dynamic_hw=True),
                        tmp_path / f"{label}.onnx")
    drop = tmp_path / "drop"
    drop.mkdir()
    key = next(iter(BAD_METADATA[label]))
    for args in (["classify", str(model), str(drop)], ["info", str(model)],
                 ["watch", str(model), str(drop), "--results", str(tmp_path / "r.jsonl"), "--once"],
                 ["serve", str(model), "--port", str(free_port())]):
        assert main(args) == EXIT_MODEL_REFUSED, (label, args[0])
        err = capsys.readouterr().err
        assert f"model metadata '{key}'" in err and "Traceback" not in err, (label, args[0], err)
