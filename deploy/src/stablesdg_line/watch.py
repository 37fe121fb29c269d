"""Drop-folder watcher: classify each new image exactly once, append JSONL results, move bad files aside.

The results file is also the state: on start it is read back, so a restarted watcher skips every file
(same name, size and mtime) it already recorded. A file is only read once its size and mtime were the same
in two consecutive scans and it has not been modified for `settle_seconds` (the writer has finished).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from .classifier import Classifier, Prediction

try:  # POSIX only; the line runtime targets Linux (systemd / Docker)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# Names writers use while a file is still being copied; they are renamed when complete.
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", "~")


class WatchError(RuntimeError):
    """The watcher cannot start (e.g. another watcher holds the results file)."""


@dataclass(frozen=True)
class WatchConfig:
    drop_dir: Path
    results: Path
    rejected_dir: Path
    poll_interval: float = 2.0
    settle_seconds: float = 1.0
    batch_size: int = 16


@dataclass(frozen=True)
class FileKey:
    """Identity of one delivered file: a new file under an old name (new size/mtime) is classified again."""

    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class PassSummary:
    classified: int = 0
    rejected: int = 0
    pending: int = 0  # seen but not yet stable (still being written)


def _is_candidate(entry: os.DirEntry) -> bool:
    """Regular, non-hidden, finished files only; links are never followed out of the drop folder."""
    name = entry.name
    if name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES):
        return False
    return entry.is_file(follow_symlinks=False)


def scan(drop_dir: Path) -> dict[str, FileKey]:
    keys = {}
    with os.scandir(drop_dir) as entries:
        for entry in entries:
            if _is_candidate(entry):
                with contextlib.suppress(FileNotFoundError):  # deleted between listing and stat
                    stat = entry.stat(follow_symlinks=False)
                    keys[entry.name] = FileKey(entry.name, stat.st_size, stat.st_mtime_ns)
    return keys


def load_done_keys(results: Path) -> set[FileKey]:
    """Keys already recorded; a torn last line (crash mid-write) is skipped, that file is simply redone."""
    done: set[FileKey] = set()
    if not results.exists():
        return done
    for number, line in enumerate(results.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            done.add(FileKey(row["name"], int(row["size"]), int(row["mtime_ns"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("skipping unreadable line %d of %s", number, results)
    return done


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _unique_destination(directory: Path, name: str) -> Path:
    candidate, counter = directory / name, 1
    while candidate.exists() or candidate.with_name(candidate.name + ".reason.txt").exists():
        candidate = directory / f"{Path(name).stem}-{counter}{Path(name).suffix}"
        counter += 1
    return candidate


class DropFolderWatcher:
    """Use as a context manager: it holds an exclusive lock on the results file while open."""

    def __init__(self, classifier: Classifier, config: WatchConfig):
        self.classifier = classifier
        self.config = config
        self._previous_scan: dict[str, FileKey] = {}
        self._done: set[FileKey] = set()
        self._results: IO[str] | None = None

    def __enter__(self) -> DropFolderWatcher:
        self.config.rejected_dir.mkdir(parents=True, exist_ok=True)
        self.config.results.parent.mkdir(parents=True, exist_ok=True)
        self._results = self.config.results.open("a", encoding="utf-8")
        self._lock_results()
        self._done = load_done_keys(self.config.results)
        self._terminate_torn_line()
        log.info("watching %s; %d files already done per %s", self.config.drop_dir, len(self._done),
                 self.config.results)
        return self

    def __exit__(self, *exc) -> None:
        if self._results is not None:
            self._results.close()  # also releases the flock
            self._results = None

    def _lock_results(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._results.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self.__exit__()
            raise WatchError(f"another watcher is already writing {self.config.results}") from err

    def _terminate_torn_line(self) -> None:
        """After a crash mid-write, start on a fresh line so the next row is not glued to the torn one."""
        if not _ends_with_newline(self.config.results):
            self._results.write("\n")

    def run_once(self) -> PassSummary:
        """Process what is in the folder now: two scans `settle_seconds` apart, then handle stable files."""
        self.poll()
        time.sleep(self.config.settle_seconds)
        return self.poll()

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Poll until `stop` is set; an error in one pass is logged and the loop continues."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                summary = self.poll()
                if summary.classified or summary.rejected:
                    log.info("classified %d, rejected %d, pending %d", summary.classified, summary.rejected,
                             summary.pending)
            except Exception:  # e.g. drop folder briefly unmounted: keep the service alive
                log.exception("watch pass failed; retrying in %.1fs", self.config.poll_interval)
            stop.wait(self.config.poll_interval)

    def poll(self) -> PassSummary:
        """One scan: handle files unchanged since the previous scan; remember the rest for the next one."""
        current = scan(self.config.drop_dir)
        ready, pending = self._split_ready(current)
        self._previous_scan = current
        rejected = 0
        for start in range(0, len(ready), self.config.batch_size):
            rejected += self._handle_batch(ready[start:start + self.config.batch_size])
        return PassSummary(classified=len(ready) - rejected, rejected=rejected, pending=pending)

    def _split_ready(self, current: dict[str, FileKey]) -> tuple[list[FileKey], int]:
        settled_before = time.time_ns() - int(self.config.settle_seconds * 1e9)
        new = [key for key in current.values() if key not in self._done]
        ready = [key for key in new
                 if self._previous_scan.get(key.name) == key and key.mtime_ns <= settled_before]
        return sorted(ready, key=lambda k: k.name), len(new) - len(ready)

    def _handle_batch(self, keys: list[FileKey]) -> int:
        supported = [k for k in keys if Path(k.name).suffix.lower() in IMAGE_EXTENSIONS]
        predictions = self.classifier.classify([self.config.drop_dir / k.name for k in supported])
        by_name = {k.name: p for k, p in zip(supported, predictions, strict=True)}
        rejected = 0
        for key in keys:
            prediction = by_name.get(key.name) or self._unsupported(key)
            rejected_to = None if prediction.ok else self._reject(key, prediction.error)
            self._record(key, prediction, rejected_to)
            rejected += not prediction.ok
        self._results.flush()
        os.fsync(self._results.fileno())  # durable before the next batch: this is the restart state
        return rejected

    def _unsupported(self, key: FileKey) -> Prediction:
        suffix = Path(key.name).suffix or "(none)"
        reason = f"unsupported file extension {suffix}; expected one of {sorted(IMAGE_EXTENSIONS)}"
        return Prediction(str(self.config.drop_dir / key.name), None, None, {}, 0.0,
                          self.classifier.model_version, reason)

    def _reject(self, key: FileKey, reason: str) -> str | None:
        """Move a bad file aside with a <name>.reason.txt; a failure here is logged, never fatal."""
        try:
            destination = _unique_destination(self.config.rejected_dir, key.name)
            shutil.move(self.config.drop_dir / key.name, destination)
            destination.with_name(destination.name + ".reason.txt").write_text(
                f"{reason}\nfile: {key.name}\nsize: {key.size}\nrejected_at: {_now_iso()}\n"
                f"model_version: {self.classifier.model_version}\n", encoding="utf-8")
            log.warning("rejected %s: %s", key.name, reason)
            return str(destination)
        except OSError:
            log.exception("could not move rejected file %s aside", key.name)
            return None

    def _record(self, key: FileKey, prediction: Prediction, rejected_to: str | None) -> None:
        row = {**prediction.to_row(), "name": key.name, "size": key.size, "mtime_ns": key.mtime_ns,
               "processed_at": _now_iso(), "rejected_to": rejected_to}
        self._results.write(json.dumps(row) + "\n")
        self._done.add(key)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
