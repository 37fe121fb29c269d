"""Drop-folder watch: every valid file classified exactly once (also across restarts), bad ones set aside."""

import json
import os
import threading
import time
from collections import Counter

import pytest
from corpus import RED, image_bytes, noisy_bytes, write_malformed_corpus, write_valid_corpus

from stablesdg_line import Classifier
from stablesdg_line.cli import EXIT_MODEL_REFUSED, main
from stablesdg_line.watch import DropFolderWatcher, WatchConfig, WatchError

SETTLE = "0.2"


def watch_once(model, drop, rejected, results, grace: str = "0") -> int:
    return main(["watch", str(model), str(drop), "--results", str(results), "--rejected-dir", str(rejected),
                 "--once", "--settle-seconds", SETTLE, "--incomplete-grace-seconds", grace])


def rows_by_name(results) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in results.read_text().splitlines():
        if line.startswith("{") and line.endswith("}"):
            row = json.loads(line)
            rows.setdefault(row["name"], []).append(row)
    return rows


def write_ignored_entries(drop, tmp_path) -> list[str]:
    (drop / "folder.png").mkdir()  # a directory named like an image
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_bytes(RED))
    (drop / "link.png").symlink_to(outside)  # links are not followed out of the drop folder
    (drop / ".hidden.png").write_bytes(image_bytes(RED))
    (drop / "upload.png.part").write_bytes(image_bytes(RED)[:50])  # writer has not renamed it yet
    return ["folder.png", "link.png", ".hidden.png", "upload.png.part"]


def test_corpus_classified_once_bad_files_moved_aside_and_restart_safe(rgb_model, dirs, tmp_path):
    drop, rejected, results = dirs
    valid = write_valid_corpus(drop)
    malformed = write_malformed_corpus(drop)
    ignored = write_ignored_entries(drop, tmp_path)

    assert watch_once(rgb_model, drop, rejected, results) == 0
    rows = rows_by_name(results)
    assert set(rows) == set(valid) | set(malformed)
    for name, expected in valid.items():
        assert [r["class"] for r in rows[name]] == [expected], name
        assert (drop / name).exists()
    for name, reason_word in malformed.items():
        (row,) = rows[name]
        assert row["class"] is None and reason_word in row["error"], (name, row["error"])
        assert not (drop / name).exists() and (rejected / name).exists()
        assert row["rejected_to"] == str(rejected / name)
        assert reason_word in (rejected / f"{name}.reason.txt").read_text()
    assert all(os.path.lexists(drop / name) for name in ignored)

    # Restart after a crash that tore the last line: nothing is classified twice.
    with results.open("a") as handle:
        handle.write('{"name": "red.png", "si')
    assert watch_once(rgb_model, drop, rejected, results) == 0
    # A late valid file and a second bad file under an already-used name arrive; only they are new.
    (drop / "late.png").write_bytes(image_bytes(RED))
    (drop / "empty.png").write_bytes(b"")
    assert watch_once(rgb_model, drop, rejected, results) == 0
    rows = rows_by_name(results)
    counts = Counter({name: len(r) for name, r in rows.items()})
    assert counts["late.png"] == 1 and rows["late.png"][0]["class"] == "red_defect"
    assert counts["empty.png"] == 2 and (rejected / "empty-1.png.reason.txt").exists()
    assert all(counts[name] == 1 for name in valid)


def test_file_still_being_written_waits_until_complete(rgb_model, dirs):
    drop, rejected, results = dirs
    payload = noisy_bytes("PNG")
    target = drop / "growing.png"
    started = threading.Event()

    def slow_writer():
        with target.open("wb") as handle:
            for start in range(0, len(payload), len(payload) // 20):
                handle.write(payload[start:start + len(payload) // 20])
                handle.flush()
                started.set()
                time.sleep(0.05)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    started.wait(5)
    config = WatchConfig(drop, results, rejected, settle_seconds=0.5)  # > any gap between writes
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        during = watcher.run_once()
        writer.join()
        results_while_writing = results.read_text()
        after = watcher.run_once()
    assert during.pending == 1 and during.classified == during.rejected == 0
    assert results_while_writing == ""
    assert after.classified == 1 and after.rejected == 0
    assert list(rows_by_name(results)) == ["growing.png"]


def test_run_forever_keeps_going_through_bad_files(rgb_model, dirs):
    drop, rejected, results = dirs
    config = WatchConfig(drop, results, rejected, poll_interval=0.05, settle_seconds=0.1)
    stop = threading.Event()
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        loop = threading.Thread(target=watcher.run_forever, args=(stop,))
        loop.start()
        (drop / "a_bad.png").write_bytes(b"garbage")
        (drop / "b_good.png").write_bytes(image_bytes(RED))
        deadline = time.monotonic() + 10
        while len(rows_by_name(results)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        (drop / "c_after.png").write_bytes(image_bytes(RED))
        while len(rows_by_name(results)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        loop.join(5)
    rows = rows_by_name(results)
    assert not loop.is_alive()
    assert sorted(rows) == ["a_bad.png", "b_good.png", "c_after.png"]
    assert [rows["b_good.png"][0]["class"], rows["c_after.png"][0]["class"]] == ["red_defect", "red_defect"]
    assert (rejected / "a_bad.png.reason.txt").exists()


def test_second_watcher_on_same_results_is_refused(rgb_model, dirs):
    drop, rejected, results = dirs
    config = WatchConfig(drop, results, rejected)
    with DropFolderWatcher(Classifier(rgb_model), config), pytest.raises(WatchError, match="another watcher"):
        DropFolderWatcher(Classifier(rgb_model), config).__enter__()
    assert watch_once(rgb_model, drop, rejected, results) == 0  # lock released on exit


def test_missing_drop_dir_is_a_clear_error(rgb_model, dirs, capsys):
    drop, rejected, results = dirs
    assert watch_once(rgb_model, drop / "nope", rejected, results) == EXIT_MODEL_REFUSED
    assert "nope" in capsys.readouterr().err
