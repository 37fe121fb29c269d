"""HTTP service (FastAPI): GET /health, GET /model, POST /classify. Needs the `serve` extra.

Limits, each enforced before the work it protects:
- the bearer token and the declared body size, before any byte of the body is read;
- the body size again on the bytes actually received, whatever Content-Length or Transfer-Encoding say;
- the upload spool: the declared bodies of all requests in progress share `max_spool_bytes` (uploads are
  spooled to temporary files, RAM on a tmpfs /tmp); beyond it 503 with Retry-After before the body is read;
- the number of files and the pixels of the whole request (from image headers), before any pixel is decoded;
- decode + inference slots: at most `max_concurrent` requests decode at once and `max_waiting` wait for a
  slot (up to `queue_timeout_s`); beyond that the answer is 503 with Retry-After, not unbounded memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse

from .batching import DEFAULT_MAX_BATCH
from .classifier import Classifier
from .images import Deadline, ImageRejected, probe
from .reload import ModelSlot
from .review import ReviewFolder

PUBLIC_PATHS = frozenset({"/health"})  # probes (Docker HEALTHCHECK, load balancers) need no token
DEFAULT_MAX_UPLOAD_MB = 20
# Ten 19 MB uploads at once put 190 MB in /tmp (issue 24): the bodies of all requests in progress share this.
DEFAULT_MAX_SPOOL_MB = 64
# Images are decoded one at a time, but each can be up to max_pixels: cap the work one request can ask for.
DEFAULT_MAX_FILES = 32
# Decoding is what costs memory and CPU (a 116 kB PNG can be 40 MP): 64 MP is one full-size image and a
# half, about 0.7 s of decoding on one core.
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_WAITING = 16
DEFAULT_QUEUE_TIMEOUT_S = 10.0
# After a request that decoded this many pixels, hand freed buffers back to the OS (costs ~1 ms).
TRIM_AFTER_PIXELS = 1_000_000


@dataclass(frozen=True)
class ServeConfig:
    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_MB * 1024 * 1024
    max_files: int = DEFAULT_MAX_FILES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_waiting: int = DEFAULT_MAX_WAITING
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    max_batch: int = DEFAULT_MAX_BATCH  # images of concurrent requests share one run, at most this many
    batch_wait_s: float = 0.0  # > 0: wait this long for more requests to batch with


class Busy(RuntimeError):
    """Every decode slot is taken and the wait queue is full or the wait timed out."""


class WorkLimiter:
    """At most `slots` holders at once; at most `max_waiting` callers queue, each for `timeout_s`."""

    def __init__(self, slots: int, max_waiting: int, timeout_s: float):
        self._slots = threading.BoundedSemaphore(max(1, slots))
        self._lock = threading.Lock()
        self._waiting = 0
        self.max_waiting = max(0, max_waiting)
        self.timeout_s = timeout_s

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise Busy(f"{self.max_waiting} requests are already waiting")
                self._waiting += 1
            try:
                acquired = self._slots.acquire(timeout=self.timeout_s)
            finally:
                with self._lock:
                    self._waiting -= 1
            if not acquired:
                raise Busy(f"no decode slot free within {self.timeout_s:g} s")
        try:
            yield
        finally:
            self._slots.release()


def _libc_malloc_trim():
    """glibc keeps freed decode buffers in its arenas; malloc_trim(0) hands them back to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_memory = _libc_malloc_trim()


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _json(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class _BodyTooLarge(Exception):
    pass


class SpoolBudget:
    """Declared bytes of the request bodies in progress, at most `total` (used from the event loop only)."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class GateMiddleware:
    """Token and size checks before the body is read; then the size again on the bytes actually received."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config
        self.spool = SpoolBudget(config.max_spool_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        size = int(_header(scope, b"content-length") or 0)  # checked by _refusal: digits, within the limit
        if not self.spool.take(size):
            in_use, total = self.spool.used / 2**20, self.spool.total / 2**20
            refusal = _json(503, f"upload spool full: {in_use:.1f} MB of the {total:g} MB (--max-spool-mb) "
                                 "held by uploads in progress; retry later",
                            Connection="close", **{"Retry-After": "1"})
            return await refusal(scope, receive, send)
        try:
            return await self._counted(scope, receive, send)
        finally:
            self.spool.give(size)

    async def _counted(self, scope, receive, send):
        """Count body bytes as they arrive: a body that outgrows the limit is cut off with 413."""
        limit = self.config.max_upload_bytes
        state = {"received": 0, "exceeded": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["exceeded"]:
                return  # the app's own answer to the aborted body (e.g. a 400) is replaced by the 413
            state["started"] |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            response = _json(413, f"upload larger than {limit} bytes (counted on the bytes received)",
                             Connection="close")
            await response(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        if self.config.token and scope["path"] not in PUBLIC_PATHS and not self._authorised(scope):
            return _json(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            return self._size_refusal(scope)
        return None

    def _authorised(self, scope) -> bool:
        expected = f"Bearer {self.config.token}".encode()
        return hmac.compare_digest((_header(scope, b"authorization") or "").encode(), expected)

    def _size_refusal(self, scope) -> JSONResponse | None:
        length = _header(scope, b"content-length")
        if _header(scope, b"transfer-encoding") is not None:
            if length is not None:  # request smuggling shape: the two headers frame the body differently
                return _json(400, "conflicting Content-Length and Transfer-Encoding headers",
                             Connection="close")
            return _json(411, "Content-Length required (chunked uploads are not accepted)",
                         Connection="close")
        if length is None:
            return _json(411, "Content-Length required", Connection="close")
        if not length.isdigit() or int(length) > self.config.max_upload_bytes:
            return _json(413, f"upload larger than {self.config.max_upload_bytes} bytes", Connection="close")
        return None


def _request_pixels(files: list[UploadFile], max_pixels: int) -> int:
    """Pixels the request asks to decode, from the headers; bad files count 0 (they fail per file later)."""
    total = 0
    for upload in files:
        try:
            total += probe(upload.file, max_pixels).pixels
        except ImageRejected:
            continue
    return total


def create_app(model: Classifier | ModelSlot, config: ServeConfig | None = None,
               review: ReviewFolder | None = None) -> FastAPI:
    """A ModelSlot lets the model be swapped while serving (reload.py); each request uses one model."""
    config = config or ServeConfig()
    slot = model if isinstance(model, ModelSlot) else ModelSlot(model)
    limiter = WorkLimiter(config.max_concurrent, config.max_waiting, config.queue_timeout_s)
    app = FastAPI(title="StableSDG line classifier", version=slot.get().model_version,
                  docs_url=None, redoc_url=None, openapi_url=None)  # no schema browsing on a line PC
    app.state.limiter = limiter
    app.state.slot = slot
    if config.max_batch > 1:
        app.state.batcher = slot.prepare_each(
            lambda classifier: classifier.enable_batching(config.max_batch, config.batch_wait_s))

    @app.get("/health")
    async def health() -> dict:
        # async: answered on the event loop itself, not behind the decode requests in the threadpool (with
        # 16 clients posting hostile files, the sync version took 200-300 ms to answer; issue 24)
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict:
        info = slot.get().describe()
        info.pop("path")  # the server's filesystem layout is nobody's business
        return info

    @app.post("/classify")
    def classify(files: Annotated[list[UploadFile], File()]) -> JSONResponse:
        # A sync endpoint runs in the threadpool; onnxruntime sessions are safe to share across threads.
        with slot.lease() as classifier:  # the model this request started with, even across a reload
            return _classify(classifier, files)

    def _classify(classifier: Classifier, files: list[UploadFile]) -> JSONResponse:
        if len(files) > config.max_files:
            return _json(413, f"at most {config.max_files} files per request")
        names = [upload.filename or f"upload-{i}" for i, upload in enumerate(files)]
        pixels = 0
        try:
            # Headers are parsed inside the slot too: parsing is part of an image's cost (issue 24).
            with limiter.slot():
                pixels = _request_pixels(files, classifier.options.max_pixels)
                if pixels > config.max_request_pixels:
                    return _json(413, f"the images in this request have {pixels} pixels in all, above the "
                                      f"per-request budget of {config.max_request_pixels}; send fewer per "
                                      "request")
                # One decode deadline for the whole request, from the moment it holds a slot: a slow file
                # cannot hold a slot longer than --decode-timeout (issue 24).
                deadline = Deadline.after(classifier.options.decode_timeout_s, "for the whole request")
                predictions = classifier.classify([upload.file for upload in files], names=names,
                                                  deadline=deadline)
        except Busy as err:
            return _json(503, f"busy, retry later: {err}", **{"Retry-After": "1"})
        finally:
            if pixels > TRIM_AFTER_PIXELS:
                release_memory()
        if review is not None:  # after the slot is released: copying files is not inference work
            review.keep_all(predictions, [upload.file for upload in files], classifier.sha256)
        rows = [p.to_row() for p in predictions]
        failed = sum(not p.ok for p in predictions)
        # 422 when any upload is not a decodable image; the body still carries every file's result.
        status = 422 if failed else 200
        return JSONResponse({"model_version": classifier.model_version, "results": rows, "failed": failed},
                            status_code=status)

    app.add_middleware(GateMiddleware, config=config)
    return app
