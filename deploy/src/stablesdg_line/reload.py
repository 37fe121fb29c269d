"""Swap the model a running `serve` or `watch` uses, without dropping a request or a file.

A reload is asked for by SIGHUP, or with `--follow` by the model file changing (an atomic swap, as
`stablesdg-line pull` does it). The new file is loaded and checked in a background thread while the old model
keeps working: the sha256 pin, the contract, the warm-up run (the same checks as at start). Only a model that
passes replaces the old one, in one reference assignment; a refused one is logged with the reason and the old
one keeps running.

The pin of a reloaded file: the `sha256` in the pull description next to it (`current.json` for
`current.onnx`, written by `pull` after it checked the registry's tag), else `--expected-sha256`.

In `serve`, a request leases the model it starts with (`ModelSlot.lease`), so a model is closed only when
its last request is done. In `watch`, a batch of files is classified by the model it started with.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .classifier import Classifier

log = logging.getLogger("stablesdg_line.reload")

DEFAULT_FOLLOW_INTERVAL_S = 1.0


class ModelSlot:
    """The model in use; `lease()` hands it to one request, `swap()` replaces it for the next ones."""

    def __init__(self, classifier: Classifier):
        self._current = classifier
        self._lock = threading.Lock()
        self._leases: dict[int, int] = {}  # id(model) -> requests using it now
        self._retiring: dict[int, Classifier] = {}  # replaced models still in use: closed by their last lease
        self._prepare: Callable[[Classifier], object] | None = None

    def get(self) -> Classifier:
        return self._current

    def prepare_each(self, prepare: Callable[[Classifier], object]) -> object:
        """Run `prepare` (e.g. batching) on the current model now, and on each new one before it serves."""
        self._prepare = prepare
        return prepare(self._current)

    @contextmanager
    def lease(self) -> Iterator[Classifier]:
        with self._lock:
            model = self._current
            self._leases[id(model)] = self._leases.get(id(model), 0) + 1
        try:
            yield model
        finally:
            retired = None
            with self._lock:
                left = self._leases.pop(id(model)) - 1
                if left:
                    self._leases[id(model)] = left
                else:
                    retired = self._retiring.pop(id(model), None)
            if retired is not None:
                retired.close()

    def swap(self, new: Classifier) -> Classifier:
        if self._prepare is not None:
            self._prepare(new)
        with self._lock:
            old, self._current = self._current, new
            in_use = id(old) in self._leases
            if in_use:
                self._retiring[id(old)] = old
        if not in_use:
            old.close()
        return old


def description_path(model_path: Path) -> Path:
    """`pull` describes DEST/current.onnx in DEST/current.json."""
    return model_path.with_suffix(".json")


def described_sha256(model_path: Path) -> str | None:
    try:
        sha = json.loads(description_path(model_path).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) and sha else None


def file_identity(model_path: Path) -> tuple:
    """What changes when the file (or its pull description) is replaced: inode, size, mtime of both."""
    identity = []
    for path in (model_path, description_path(model_path)):
        try:
            info = os.stat(path)
            identity.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
        except OSError:
            identity.append(None)
    return tuple(identity)


@dataclass(frozen=True)
class ReloadOutcome:
    loaded: bool
    reason: str  # what happened, for the log
    old_version: str
    new_version: str | None = None
    load_s: float = 0.0  # reading, checking and warming up the new model (the old one serves meanwhile)
    # install: prepare the new model (serve: its batching thread), swap the reference, close the old one if
    # idle. Requests never wait for it: each holds the model it started with.
    swap_s: float = 0.0


class Reloader:
    """A background thread that reloads `model_path` when asked (`request()`, e.g. from SIGHUP) or, with
    `follow_interval_s`, when the file has changed and then stayed the same for one more interval."""

    def __init__(self, model_path: Path, load: Callable[[Path, str | None], Classifier],
                 install: Callable[[Classifier], Classifier], current: Callable[[], Classifier],
                 pin: str | None = None, follow_interval_s: float | None = None):
        self.model_path = Path(model_path)
        self._load, self._install, self._current = load, install, current
        self._pin = pin
        self.follow_interval_s = follow_interval_s
        self._asked = threading.Event()
        self._stop = threading.Event()
        self._seen = file_identity(self.model_path)  # the file as it was when the current model loaded
        self._thread: threading.Thread | None = None
        self.outcomes: list[ReloadOutcome] = []

    def request(self) -> None:
        """Safe from a signal handler: only sets a flag; the thread does the work."""
        self._asked.set()

    def start(self) -> Reloader:
        self._thread = threading.Thread(target=self._loop, name="stablesdg-line-reload", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._asked.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> Reloader:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        candidate = None
        while not self._stop.is_set():
            asked = self._asked.wait(self.follow_interval_s)
            if self._stop.is_set():
                return
            if asked:
                self._asked.clear()
                self.reload("reload requested (SIGHUP)")
                candidate = None
                continue
            identity = file_identity(self.model_path)
            if identity == self._seen:
                candidate = None
            elif identity == candidate:  # changed, then unchanged for one interval: the writer is done
                self.reload("model file changed (--follow)")
                candidate = None
            else:
                candidate = identity

    def reload(self, why: str) -> ReloadOutcome:
        old = self._current()
        identity = file_identity(self.model_path)
        start = time.perf_counter()
        try:
            new = self._load(self.model_path, described_sha256(self.model_path) or self._pin)
        except Exception as err:  # noqa: BLE001 - any load failure is a refusal; the old model keeps running
            outcome = ReloadOutcome(False, f"{why}: refused {self.model_path}, still running "
                                           f"v{old.model_version}: {err}", old.model_version,
                                    load_s=time.perf_counter() - start)
            log.error("%s", outcome.reason)
        else:
            load_s = time.perf_counter() - start
            if new.sha256 == old.sha256:
                new.close()
                outcome = ReloadOutcome(False, f"{why}: {self.model_path} is the model already running "
                                               f"(v{old.model_version}); nothing to do", old.model_version,
                                        load_s=load_s)
                log.info("%s", outcome.reason)
            else:
                swap_start = time.perf_counter()
                self._install(new)
                outcome = ReloadOutcome(True, f"{why}: now running v{new.model_version} (sha256 "
                                              f"{new.sha256[:12]}), was v{old.model_version} (sha256 "
                                              f"{old.sha256[:12]})", old.model_version, new.model_version,
                                        load_s, time.perf_counter() - swap_start)
                log.info("%s; load and checks %.3f s, install %.6f s", outcome.reason, load_s, outcome.swap_s)
        self._seen = identity  # a refused file is not retried until it changes again (or SIGHUP)
        self.outcomes.append(outcome)
        return outcome
