"""Issue 14.7: watch mode neither loses nor repeats work (signals, interrupted rejects, slow writers)."""

import logging
import os
import signal
import subprocess
import threading
import time

from corpus import RED, image_bytes, noisy_bytes
from processes import cli_command
from test_watch import rows_by_name, watch_once, write_ignored_entries

from stablesdg_line import Classifier
from stablesdg_line.cli import main
from stablesdg_line.watch import DropFolderWatcher, WatchConfig


def test_sigterm_right_after_a_reject_move_loses_no_row(rgb_model, dirs):
    drop, rejected, results = dirs
    bad = [f"bad{i:03d}.png" for i in range(60)]
    good = [f"good{i:03d}.png" for i in range(60)]
    for name in bad:
        (drop / name).write_bytes(b"not an image " + name.encode())
    for name in good:
        (drop / name).write_bytes(image_bytes(RED))
    old = time.time() - 5
    for name in bad + good:
        os.utime(drop / name, (old, old))
    process = subprocess.Popen(cli_command("watch", str(rgb_model), str(drop), "--results", str(results),
                                           "--rejected-dir", str(rejected), "--poll-interval", "0.05",
                                           "--settle-seconds", "0.05", "--incomplete-grace-seconds", "0",
                                           "--batch-size", "4"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not any(p.suffix == ".png" for p in rejected.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)  # right after the first move
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output.decode()
    assert b"SIGTERM received" in output
    rows = rows_by_name(results)
    moved = {p.name for p in rejected.glob("*.png")}
    assert moved and moved <= set(rows)  # every file that left the drop folder has its row
    assert all(rows[name][0]["rejected_to"] == str(rejected / name) for name in moved)
    assert len(rows) < len(bad) + len(good)  # it really stopped early
    # Restart: the rest is done, nothing twice.
    assert watch_once(rgb_model, drop, rejected, results) == 0
    rows = rows_by_name(results)
    assert sorted(rows) == sorted(bad + good) and all(len(r) == 1 for r in rows.values())
    assert {p.name for p in rejected.glob("*.png")} == set(bad)


def test_interrupted_reject_is_completed_on_the_next_start(rgb_model, dirs):
    drop, rejected, results = dirs
    (drop / "broken.png").write_bytes(b"garbage")
    (drop / "fine.png").write_bytes(image_bytes(RED))
    config = WatchConfig(drop, results, rejected, settle_seconds=0.05, incomplete_grace_seconds=0)
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        rejected.rmdir()
        rejected.write_text("in the way")  # the move fails after the intent row (as a crash would)
        first = watcher.run_once()
        again = watcher.run_once()  # not retried in a loop, not recorded twice
    assert (first.classified, first.rejected, again.rejected) == (1, 1, 0)
    assert (drop / "broken.png").exists()
    (row,) = rows_by_name(results)["broken.png"]
    assert row["rejected_to"] == str(rejected / "broken.png") and row["sha256"]
    rejected.unlink()
    rejected.mkdir()
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:  # reconcile on start
        assert not (drop / "broken.png").exists() and (rejected / "broken.png").read_bytes() == b"garbage"
        assert "garbage" not in (rejected / "broken.png.reason.txt").read_text()
        assert watcher.run_once().rejected == 0
    assert [len(r) for r in rows_by_name(results).values()] == [1, 1]


def test_slow_writer_pausing_mid_file_is_not_rejected(rgb_model, dirs):
    drop, rejected, results = dirs
    payload = noisy_bytes("PNG")
    target = drop / "slow.png"
    config = WatchConfig(drop, results, rejected, poll_interval=0.05, settle_seconds=0.1,
                         incomplete_grace_seconds=5)
    stop = threading.Event()
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        loop = threading.Thread(target=watcher.run_forever, args=(stop,))
        loop.start()
        with target.open("wb") as handle:  # the writer paused 3.5 s with settle 1 s: same ratio here
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            time.sleep(0.6)
            handle.write(payload[len(payload) // 2:])
        deadline = time.monotonic() + 10
        while not rows_by_name(results) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        loop.join(5)
    (row,) = rows_by_name(results)["slow.png"]
    assert row["error"] is None and row["class"] is not None
    assert list(rejected.iterdir()) == [] and target.read_bytes() == payload


def test_cut_short_file_is_rejected_once_the_grace_is_over(rgb_model, dirs):
    """The grace runs on this watcher's own clock from when it first saw the file (issue 24: readiness must
    not depend on the camera's clock), so a backdated mtime does not shorten it and a running watcher rejects
    the file once the grace is over."""
    drop, rejected, results = dirs
    (drop / "cut.png").write_bytes(noisy_bytes("PNG")[:3000])
    old = time.time() - 60
    os.utime(drop / "cut.png", (old, old))
    assert watch_once(rgb_model, drop, rejected, results, grace="30") == 0
    assert not results.read_text() and (drop / "cut.png").exists()  # deferred: the writer may come back
    config = WatchConfig(drop, results, rejected, poll_interval=0.05, settle_seconds=0.05,
                         incomplete_grace_seconds=1.0)
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        first = watcher.run_once()
        time.sleep(1.1)
        second = watcher.run_once()
        assert first.rejected == 0, "within the grace on this watcher's clock"
        assert second.rejected == 1
    assert "cannot decode image data" in rows_by_name(results)["cut.png"][0]["error"]
    assert (rejected / "cut.png").exists()


def test_touch_does_not_classify_again_but_new_content_does(rgb_model, dirs):
    drop, rejected, results = dirs
    (drop / "a.png").write_bytes(image_bytes(RED))
    assert watch_once(rgb_model, drop, rejected, results) == 0
    later = time.time() + 1
    os.utime(drop / "a.png", (later, later))  # `touch`: same bytes, new mtime
    assert watch_once(rgb_model, drop, rejected, results) == 0
    assert len(rows_by_name(results)["a.png"]) == 1
    (drop / "a.png").write_bytes(image_bytes((200, 0, 0)))  # new content under the old name
    assert watch_once(rgb_model, drop, rejected, results) == 0
    assert len(rows_by_name(results)["a.png"]) == 2


def test_ignored_entries_are_logged_once_at_verbose(rgb_model, dirs, tmp_path, caplog):
    drop, rejected, results = dirs
    ignored = write_ignored_entries(drop, tmp_path)
    os.mkfifo(drop / "camera.fifo.png")
    caplog.set_level(logging.DEBUG, logger="stablesdg_line")
    args = ["-v", "watch", str(rgb_model), str(drop), "--results", str(results), "--rejected-dir",
            str(rejected), "--once", "--settle-seconds", "0.05"]
    assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring ")]
    for name in [*ignored, "camera.fifo.png"]:
        assert sum(line.startswith(f"ignoring {name}: ") for line in lines) == 1, (name, lines)
    assert any("camera.fifo.png: not a regular file (FIFO)" in line for line in lines)
    assert any("link.png: symbolic link" in line for line in lines)
    assert not results.read_text()
