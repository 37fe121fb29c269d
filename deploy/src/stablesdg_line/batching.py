"""Coalesce concurrent inference calls into one onnxruntime run (serve: requests that arrive together).

One worker thread owns the session runs. A caller hands in its preprocessed batch and waits; the worker takes
the first waiting batch, adds every batch already queued behind it (and, with `max_wait_s` > 0, those that
arrive within that time) up to `max_batch` images, runs them as one batch and hands each caller its rows.
With `max_wait_s` = 0 (the default) nobody waits for company: batches form only from calls that queued while
the previous run was busy, so a lone request pays no extra latency. A caller's batch larger than `max_batch`
runs on its own, unsplit. A run that raises hands the error to every caller of that run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_BATCH = 32


@dataclass
class _Job:
    x: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    runs: int = 0
    images: int = 0
    largest: int = 0


class MicroBatcher:
    """Thread-safe: `run(x)` from any number of threads; `close()` (or `with`) stops the worker."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_s: float = 0.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run_batch = run_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="stablesdg-line-batcher", daemon=True)
        self._thread.start()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for `x` [N, C, H, W], computed in a batch with whatever else is waiting."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        job = _Job(np.ascontiguousarray(x))
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return self._queue.get()
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            jobs, size, stop = [first], len(first.x), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:
                    job = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if size + len(job.x) > self.max_batch:
                    self._carry = job  # first in the next run: order is kept
                    break
                jobs.append(job)
                size += len(job.x)
            self._execute(jobs)
            if stop:
                self._drain()
                return

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([job.x for job in jobs])
            out = self._run_batch(x)
            self.stats.runs += 1
            self.stats.images += len(x)
            self.stats.largest = max(self.stats.largest, len(x))
            start = 0
            for job in jobs:
                job.result = out[start:start + len(job.x)]
                start += len(job.x)
        except BaseException as err:  # the callers get the error; the worker lives on
            for job in jobs:
                job.error = err
        finally:
            for job in jobs:
                job.done.set()

    def _drain(self) -> None:
        """After close: run what is still queued, so no caller waits forever."""
        pending = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            self._execute([job])
