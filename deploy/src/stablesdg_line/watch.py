"""Drop-folder watcher: classify each new image exactly once, append JSONL results, move bad files aside.

The results file is also the state: on start it is read back, and a file whose name and content (sha256)
are already recorded as classified is skipped, whatever its mtime says (`touch` does not redo it). A file
is only read once its size and mtime were the same in two consecutive scans and it has not been modified
for `settle_seconds` (the writer has finished).

Rejecting is crash-safe: the result row, which names the destination, is written and fsynced first (the
intent), then the file is moved. On start, a recorded reject whose file is still in the drop folder is
completed (reconcile). SIGTERM and SIGINT finish the current batch and exit cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from .classifier import Classifier, Prediction
from .images import INCOMPLETE_REASONS, ImageRejected, file_kind, open_regular_file
from .review import ReviewFolder

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
    # A file that looks unfinished (empty, or its image data is cut short) is retried, not rejected, until
    # it has been unchanged this long: a writer that pauses mid-copy must not lose its file to rejected/.
    incomplete_grace_seconds: float = 30.0


@dataclass(frozen=True)
class FileKey:
    """What a scan sees of one entry; only used to tell whether a file is still changing."""

    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ReadyFile:
    key: FileKey
    sha256: str


@dataclass(frozen=True)
class PassSummary:
    classified: int = 0
    rejected: int = 0
    pending: int = 0  # seen but not yet stable (still being written)
    deferred: int = 0  # looked unfinished (empty / cut short): retried until incomplete_grace_seconds


@dataclass
class _State:
    done: set[tuple[str, str]] = field(default_factory=set)  # (name, sha256) classified, file still here
    stuck: set[tuple[str, str]] = field(default_factory=set)  # rejected, but the move failed: not redone
    legacy_done: set[FileKey] = field(default_factory=set)  # rows written before sha256 was recorded
    known: dict[FileKey, str] = field(default_factory=dict)  # stat key -> sha256, to hash each version once

    def handled(self, name: str, sha256: str) -> bool:
        return (name, sha256) in self.done or (name, sha256) in self.stuck


def _ignore_reason(entry: os.DirEntry) -> str | None:
    """Why an entry is not a candidate (None: it is a regular, visible, finished file)."""
    name = entry.name
    if name.startswith("."):
        return "hidden name"
    if name.endswith(IN_PROGRESS_SUFFIXES):
        return "in-progress name (rename it when the copy is complete)"
    try:
        if entry.is_symlink():
            return "symbolic link (links are not followed out of the drop folder)"
        if entry.is_dir(follow_symlinks=False):
            return "directory"
        if not entry.is_file(follow_symlinks=False):
            return f"not a regular file ({file_kind(entry.stat(follow_symlinks=False).st_mode)})"
    except OSError as err:
        return f"cannot stat: {err.strerror or err}"
    return None


def sha256_of(path: Path) -> str:
    """Streamed content hash; only regular files are opened (a FIFO swapped in cannot hang the watcher)."""
    digest = hashlib.sha256()
    with open_regular_file(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_rows(results: Path) -> Iterator[dict]:
    """Rows of the results file, streamed line by line (start-up memory does not grow with the history);
    a torn last line (crash mid-write) is skipped, that file is simply redone."""
    if not results.exists():
        return
    with results.open("r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
                FileKey(row["name"], int(row["size"]), int(row["mtime_ns"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
                if line.strip():
                    log.warning("skipping unreadable line %d of %s", number, results)
                continue
            yield row


def read_rows(results: Path) -> list[dict]:
    return list(iter_rows(results))


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


def _maybe_incomplete(reason: str | None) -> bool:
    return reason is not None and reason.startswith(INCOMPLETE_REASONS)


class DropFolderWatcher:
    """Use as a context manager: it holds an exclusive lock on the results file while open."""

    def __init__(self, classifier: Classifier, config: WatchConfig, review: ReviewFolder | None = None):
        self.classifier = classifier
        self.config = config
        self.review = review  # copies of the files the model is unsure of (review.py)
        self._previous_scan: dict[str, FileKey] = {}
        # When this process first saw each version of a file (monotonic clock): readiness and the grace
        # period never compare the writer's mtime with our clock (a camera or share may be hours off).
        self._first_seen: dict[FileKey, float] = {}
        self._results_identity: tuple[int, int] | None = None
        self._state = _State()
        self._results: IO[str] | None = None
        self._ignored_logged: set[tuple[str, str]] = set()
        self._deferred_logged: set[FileKey] = set()

    def __enter__(self) -> DropFolderWatcher:
        self.config.rejected_dir.mkdir(parents=True, exist_ok=True)
        self.config.results.parent.mkdir(parents=True, exist_ok=True)
        self._results = self.config.results.open("a", encoding="utf-8")
        self._lock_results()
        self._results_identity = self._identity()
        rows = self._load_state()
        self._terminate_torn_line()
        self._reconcile(rows)
        log.info("watching %s; %d files already done per %s", self.config.drop_dir,
                 len(self._state.done) + len(self._state.legacy_done), self.config.results)
        return self

    def _load_state(self) -> list[dict]:
        """Keep only the history of names now in the drop folder: memory follows the folder, not the file.

        Returns the reject rows whose file may still need its interrupted move finished (reconcile).
        """
        present = set(self._listed_names())
        pending_rejects: list[dict] = []
        for row in iter_rows(self.config.results):
            if row["name"] not in present:
                continue
            if row.get("rejected_to"):
                pending_rejects.append(row)  # moved away: the same name again is a new delivery
            elif row.get("sha256"):
                self._state.done.add((row["name"], row["sha256"]))
            else:
                self._state.legacy_done.add(FileKey(row["name"], int(row["size"]), int(row["mtime_ns"])))
        return pending_rejects

    def _listed_names(self) -> Iterator[str]:
        try:
            with os.scandir(self.config.drop_dir) as entries:
                for entry in entries:
                    yield entry.name
        except FileNotFoundError:
            return

    def _identity(self) -> tuple[int, int]:
        info = os.fstat(self._results.fileno())
        return info.st_dev, info.st_ino

    def _check_results_file(self) -> None:
        """Before each write: the path must still be the file we hold open. Rows written to a deleted or
        replaced file would be lost without a word, and their files classified again on restart."""
        try:
            info = os.stat(self.config.results)
            same = (info.st_dev, info.st_ino) == self._results_identity
        except FileNotFoundError:
            same = False
        if not same:
            raise WatchError(f"results file {self.config.results} was deleted or replaced while watching; "
                             "stopping before any row is lost. Restore it (or rotate only while the watcher "
                             "is stopped, see the README) and start again")

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
            self._sync()

    def _reconcile(self, rows: list[dict]) -> None:
        """Finish rejects whose row was written but whose move was interrupted (crash, SIGKILL, power)."""
        for row in rows:
            destination = row.get("rejected_to")
            if not destination or not row.get("sha256"):
                continue
            source, destination = self.config.drop_dir / row["name"], Path(destination)
            if destination.exists() or not source.is_file() or source.is_symlink():
                continue
            try:
                if sha256_of(source) != row["sha256"]:
                    continue  # a new file under the old name: it is classified on its own
                self._move_aside(source, destination, row.get("error") or "rejected", row["size"])
                log.warning("completed the interrupted reject of %s -> %s", row["name"], destination)
            except (OSError, ImageRejected):
                log.exception("could not complete the reject of %s", row["name"])

    def run_once(self, stop: threading.Event | None = None) -> PassSummary:
        """Process what is in the folder now: two scans `settle_seconds` apart, then handle stable files. The
        summary counts the work of both scans (a file ready at the first, e.g. past its grace, counts too)."""
        first = self.poll(stop)
        time.sleep(self.config.settle_seconds)
        second = self.poll(stop)
        return PassSummary(classified=first.classified + second.classified,
                           rejected=first.rejected + second.rejected,
                           pending=second.pending, deferred=second.deferred)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Poll until `stop` is set; an error in one pass is logged and the loop continues."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                summary = self.poll(stop)
                if summary.classified or summary.rejected:
                    log.info("classified %d, rejected %d, pending %d, deferred %d", summary.classified,
                             summary.rejected, summary.pending, summary.deferred)
            except WatchError:
                raise  # the results file is gone: going on would lose rows
            except Exception:  # e.g. drop folder briefly unmounted: keep the service alive
                log.exception("watch pass failed; retrying in %.1fs", self.config.poll_interval)
            stop.wait(self.config.poll_interval)

    def poll(self, stop: threading.Event | None = None) -> PassSummary:
        """One scan: handle files unchanged since the previous scan; remember the rest for the next one."""
        current = self.scan()
        ready, pending = self._split_ready(current)
        self._previous_scan = current
        totals = [0, 0, 0]
        for start in range(0, len(ready), self.config.batch_size):
            if stop is not None and stop.is_set():
                pending += len(ready) - start
                break
            for i, count in enumerate(self._handle_batch(ready[start:start + self.config.batch_size])):
                totals[i] += count
        return PassSummary(classified=totals[0], rejected=totals[1], pending=pending, deferred=totals[2])

    def scan(self) -> dict[str, FileKey]:
        keys = {}
        with os.scandir(self.config.drop_dir) as entries:
            for entry in entries:
                reason = _ignore_reason(entry)
                if reason is not None:
                    if (entry.name, reason) not in self._ignored_logged:
                        self._ignored_logged.add((entry.name, reason))
                        log.debug("ignoring %s: %s", entry.name, reason)
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted between listing and stat
                    continue
                keys[entry.name] = FileKey(entry.name, stat.st_size, stat.st_mtime_ns)
        return keys

    def _split_ready(self, current: dict[str, FileKey]) -> tuple[list[ReadyFile], int]:
        now = time.monotonic()
        self._first_seen = {key: self._first_seen.get(key, now) for key in current.values()}
        known = {key: sha for key, sha in self._state.known.items() if current.get(key.name) == key}
        ready, pending = [], 0
        for key in current.values():
            if key in self._state.legacy_done:
                continue
            sha = known.get(key)
            if sha is not None and self._state.handled(key.name, sha):
                continue
            unchanged_s = now - self._first_seen[key]
            if self._previous_scan.get(key.name) != key or unchanged_s < self.config.settle_seconds:
                pending += 1
                continue
            if sha is None:
                try:
                    sha = known[key] = sha256_of(self.config.drop_dir / key.name)
                except ImageRejected:  # unreadable (permissions): classify reports it and it is moved aside
                    sha = known[key] = f"unreadable:{key.size}:{key.mtime_ns}"
                except OSError as err:
                    log.debug("cannot hash %s yet: %s", key.name, err)
                    pending += 1
                    continue
            if not self._state.handled(key.name, sha):  # same name and bytes (e.g. `touch`): not new
                ready.append(ReadyFile(key, sha))
        self._state.known = known
        return sorted(ready, key=lambda r: r.key.name), pending

    def _handle_batch(self, files: list[ReadyFile]) -> tuple[int, int, int]:
        self._check_results_file()
        supported = [f for f in files if Path(f.key.name).suffix.lower() in IMAGE_EXTENSIONS]
        predictions = self.classifier.classify([self.config.drop_dir / f.key.name for f in supported])
        by_name = {f.key.name: p for f, p in zip(supported, predictions, strict=True)}
        classified = rejected = deferred = 0
        for item in files:
            prediction = by_name.get(item.key.name) or self._unsupported(item.key)
            if not self._unchanged(item.key):
                continue  # the writer is back: handled again once the file settles
            if not prediction.ok and self._defer(item.key, prediction.error):
                deferred += 1
                continue
            if prediction.ok:
                self._record(item, prediction, None)
                classified += 1
                if self.review is not None:
                    self.review.keep_all([prediction], [self.config.drop_dir / item.key.name],
                                        self.classifier.sha256)
            else:
                self._reject(item, prediction)
                rejected += 1
        self._sync()  # durable before the next batch: this is the restart state
        return classified, rejected, deferred

    def _unchanged(self, key: FileKey) -> bool:
        try:
            stat = os.stat(self.config.drop_dir / key.name, follow_symlinks=False)
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == (key.size, key.mtime_ns)

    def _defer(self, key: FileKey, reason: str | None) -> bool:
        age_s = time.monotonic() - self._first_seen.get(key, time.monotonic())
        if not _maybe_incomplete(reason) or age_s >= self.config.incomplete_grace_seconds:
            return False
        if key not in self._deferred_logged:
            self._deferred_logged.add(key)
            log.info("%s looks unfinished (%s); retrying until it has been unchanged for %gs", key.name,
                     reason, self.config.incomplete_grace_seconds)
        return True

    def _unsupported(self, key: FileKey) -> Prediction:
        suffix = Path(key.name).suffix or "(none)"
        reason = f"unsupported file extension {suffix}; expected one of {sorted(IMAGE_EXTENSIONS)}"
        return Prediction(str(self.config.drop_dir / key.name), None, None, {}, 0.0,
                          self.classifier.model_version, reason)

    def _reject(self, item: ReadyFile, prediction: Prediction) -> None:
        """Intent first (row + fsync, naming the destination), then the move; a move failure is logged."""
        destination = _unique_destination(self.config.rejected_dir, item.key.name)
        self._record(item, prediction, str(destination))
        self._sync()
        try:
            self._move_aside(self.config.drop_dir / item.key.name, destination, prediction.error or "",
                             item.key.size)
            log.warning("rejected %s: %s", item.key.name, prediction.error)
        except OSError:
            self._state.stuck.add((item.key.name, item.sha256))
            log.exception("could not move rejected file %s aside; retried on the next start", item.key.name)

    def _move_aside(self, source: Path, destination: Path, reason: str, size: int) -> None:
        reason_file = destination.with_name(destination.name + ".reason.txt")
        if not reason_file.exists():
            reason_file.write_text(f"{reason}\nfile: {source.name}\nsize: {size}\nrejected_at: {_now_iso()}\n"
                                   f"model_version: {self.classifier.model_version}\n", encoding="utf-8",
                                   errors="backslashreplace")  # a name that is not UTF-8 stays readable
        shutil.move(source, destination)

    def _record(self, item: ReadyFile, prediction: Prediction, rejected_to: str | None) -> None:
        key = item.key
        row = {**prediction.to_row(), "name": key.name, "size": key.size, "mtime_ns": key.mtime_ns,
               "sha256": item.sha256, "processed_at": _now_iso(), "rejected_to": rejected_to}
        self._results.write(json.dumps(row) + "\n")
        if rejected_to is None:
            self._state.done.add((key.name, item.sha256))

    def _sync(self) -> None:
        self._results.flush()
        os.fsync(self._results.fileno())


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
