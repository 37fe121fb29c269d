"""Model reload (issue 25): a real `stablesdg-line serve` / `watch` process swaps its model while it works.

v1 and v2 are the same tiny contract model with different `model_version` metadata (and so different bytes);
the file is replaced atomically, as `pull` does it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from onnx_models import RGB, write_model
from PIL import Image
from processes import cli_command, free_port, stop_process
from test_server import wait_until_up as _wait_until_up

from stablesdg_line.classifier import Classifier
from stablesdg_line.reload import ModelSlot, Reloader

CLIENTS = 8
START_S = 120  # a loaded shared 2-core machine can take long to import onnxruntime + FastAPI


def wait_until_up(http: httpx.Client, process: subprocess.Popen) -> None:
    _wait_until_up(http, process, START_S)


def versioned(path: Path, version: str) -> Path:
    return write_model(replace(RGB, metadata_overrides={"model_version": version}), path)


def swap_in(source: Path, target: Path) -> None:
    """What `pull` does: a complete file renamed over the old one."""
    tmp = target.with_name(".incoming.onnx")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def png(colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
    return buffer.getvalue()


class Load:
    """CLIENTS threads, each sending one request after the other until stopped; every answer is kept."""

    def __init__(self, base: str):
        self.base, self.stop = base, threading.Event()
        self.answers: list[list[tuple[int, str | None]]] = [[] for _ in range(CLIENTS)]
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, index: int) -> None:
        body = png()
        with httpx.Client(base_url=self.base, timeout=20) as http:
            while not self.stop.is_set():
                try:
                    answer = http.post("/classify", files=[("files", ("a.png", body, "image/png"))])
                    version = answer.json().get("model_version") if answer.status_code == 200 else None
                    self.answers[index].append((answer.status_code, version))
                except httpx.HTTPError as err:
                    self.answers[index].append((0, repr(err)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def latest(self) -> set[str | None]:
        return {answers[-1][1] for answers in self.answers if answers}

    def wait_for(self, version: str, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.latest() == {version}:
                return
            time.sleep(0.05)
        raise AssertionError(f"clients still see {self.latest()}, expected v{version}")


def start_serve(model: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(model), "--port", str(port), *extra),
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def rows_of(results: Path) -> list[dict]:
    text = results.read_text() if results.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for_rows(results: Path, count: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while len(rows_of(results)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for_text(log: Path, text: str, process: subprocess.Popen, seconds: float = START_S) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)


def assert_no_failures_and_one_switch(load: Load, old: str, new: str) -> int:
    """Every answer 200; per client the versions go old... then new... (never back). Returns the count."""
    total = 0
    for answers in load.answers:
        assert answers, "a client got no answer at all"
        assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
        versions = [version for _, version in answers]
        first_new = versions.index(new) if new in versions else len(versions)
        assert set(versions[:first_new]) <= {old} and set(versions[first_new:]) == {new}
        total += len(answers)
    return total


@pytest.mark.timeout(300)
def test_sighup_swaps_the_model_under_load_and_refuses_a_bad_one(tmp_path):
    v1, v2 = versioned(tmp_path / "v1.onnx", "1"), versioned(tmp_path / "v2.onnx", "2")
    current = tmp_path / "line" / "current.onnx"
    current.parent.mkdir()
    swap_in(v1, current)
    log = tmp_path / "serve.log"
    process, base = start_serve(current, log)
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            wait_until_up(http, process)
            with Load(base) as load:
                load.wait_for("1")
                swap_in(v2, current)
                process.send_signal(signal.SIGHUP)
                load.wait_for("2")
                time.sleep(0.3)  # more requests on v2
            total = assert_no_failures_and_one_switch(load, "1", "2")
            assert total > 2 * CLIENTS
            assert http.get("/model").json()["model_version"] == "2"

            (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
            swap_in(tmp_path / "broken.onnx", current)
            process.send_signal(signal.SIGHUP)
            wait_for_text(log, "refused", process, 20)
            answer = http.post("/classify", files=[("files", ("a.png", png(), "image/png"))])
            assert answer.status_code == 200 and answer.json()["model_version"] == "2"
            assert process.poll() is None
    finally:
        stop_process(process, grace_s=15)
    text = log.read_text()
    assert "now running v2" in text and "was v1" in text
    assert "refused" in text and "still running v2" in text and "onnxruntime cannot load" in text


@pytest.mark.timeout(300)
def test_follow_picks_up_an_atomic_swap_and_honours_the_pull_description(tmp_path):
    v1, v2, v3 = (versioned(tmp_path / f"v{n}.onnx", str(n)) for n in (1, 2, 3))
    current = tmp_path / "line" / "current.onnx"
    current.parent.mkdir()
    swap_in(v1, current)
    log = tmp_path / "serve.log"
    process, base = start_serve(current, log, "--follow", "--follow-interval", "0.2")
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            wait_until_up(http, process)
            with Load(base) as load:
                load.wait_for("1")
                swap_in(v2, current)
                load.wait_for("2")
            assert_no_failures_and_one_switch(load, "1", "2")
            # pull's description pins the next file: v3 arrives with a description naming other bytes
            (current.with_suffix(".json")).write_text(json.dumps({"version": "3", "sha256": "0" * 64}))
            swap_in(v3, current)
            wait_for_text(log, "sha256 is", process, 20)
            assert http.get("/model").json()["model_version"] == "2"
    finally:
        stop_process(process, grace_s=15)
    text = log.read_text()
    assert "model file changed (--follow): now running v2" in text
    assert "refused" in text and "expected " + "0" * 64 in text


def test_slot_closes_a_replaced_model_only_after_its_last_request(tmp_path):
    v1, v2 = (Classifier(versioned(tmp_path / f"v{n}.onnx", str(n))) for n in (1, 2))
    slot = ModelSlot(v1)
    batchers = []
    slot.prepare_each(lambda c: batchers.append(c.enable_batching(4)))
    with slot.lease() as held:
        slot.swap(v2)
        assert slot.get() is v2 and held is v1
        assert held.classify([Image.new("RGB", (8, 8), (255, 0, 0))])[0].model_version == "1"
        assert v1._batcher is not None  # still in use: not closed
    assert v1._batcher is None and v2._batcher is not None and len(batchers) == 2
    v2.close()


def test_reloader_refuses_and_does_not_retry_an_unchanged_bad_file(tmp_path):
    path = tmp_path / "current.onnx"
    swap_in(versioned(tmp_path / "v1.onnx", "1"), path)
    slot = ModelSlot(Classifier(path))
    loads = []

    def load(p, pin):
        loads.append(pin)
        return Classifier(p)

    with Reloader(path, load, slot.swap, slot.get, follow_interval_s=0.05) as reloader:
        path.write_bytes(b"garbage")
        deadline = time.monotonic() + 10
        while not reloader.outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # many follow intervals: the same bad file is not loaded again
    assert len(loads) == 1 and len(reloader.outcomes) == 1
    assert not reloader.outcomes[0].loaded and "refused" in reloader.outcomes[0].reason
    assert slot.get().model_version == "1"


@pytest.mark.timeout(300)
def test_watch_reloads_between_batches_and_loses_or_repeats_no_file(tmp_path):
    v1, v2 = versioned(tmp_path / "v1.onnx", "1"), versioned(tmp_path / "v2.onnx", "2")
    current, drop, results = tmp_path / "current.onnx", tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    swap_in(v1, current)
    log = tmp_path / "watch.log"
    process = subprocess.Popen(cli_command("watch", str(current), str(drop), "--results", str(results),
                                           "--poll-interval", "0.05", "--settle-seconds", "0.05",
                                           "--batch-size", "2", "--follow", "--follow-interval", "0.1"),
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    names = [f"img-{i:03d}.png" for i in range(60)]
    body = png()
    try:
        wait_for_text(log, "watching", process)
        for i, name in enumerate(names):
            (drop / f"{name}.part").write_bytes(body)
            os.replace(drop / f"{name}.part", drop / name)
            if i == 20:
                wait_for_rows(results, 5)  # some files on v1 first
                swap_in(v2, current)
            time.sleep(0.03)
        wait_for_rows(results, len(names))
        time.sleep(0.5)  # a double-processed file would show as an extra row
    finally:
        stop_process(process, grace_s=15)
    rows = rows_of(results)
    assert sorted(row["name"] for row in rows) == names, "a file lost or classified twice"
    assert all(row["error"] is None and row["class"] == "red_defect" for row in rows)
    versions = [row["model_version"] for row in sorted(rows, key=lambda r: r["name"])]
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}
    assert 0 < switch < len(names)  # some files on v1, the rest on v2
    assert "now running v2" in log.read_text()
