"""HTTP service (FastAPI): GET /health, GET /model, POST /classify. Needs the `serve` extra."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse

from .classifier import Classifier

PUBLIC_PATHS = frozenset({"/health"})  # probes (Docker HEALTHCHECK, load balancers) need no token
DEFAULT_MAX_UPLOAD_MB = 20
# Images are decoded one at a time, but each can be up to max_pixels: cap the work one request can ask for.
DEFAULT_MAX_FILES = 32


@dataclass(frozen=True)
class ServeConfig:
    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_files: int = DEFAULT_MAX_FILES


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class GateMiddleware:
    """Checks the bearer token and the declared body size before any byte of the body is read or parsed."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        # h11/httptools stop a body at its declared Content-Length, so checking the header is enough.
        return await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        if self.config.token and scope["path"] not in PUBLIC_PATHS and not self._authorised(scope):
            return JSONResponse({"detail": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            return self._size_refusal(scope)
        return None

    def _authorised(self, scope) -> bool:
        expected = f"Bearer {self.config.token}".encode()
        return hmac.compare_digest((_header(scope, b"authorization") or "").encode(), expected)

    def _size_refusal(self, scope) -> JSONResponse | None:
        length = _header(scope, b"content-length")
        if length is None:
            return JSONResponse({"detail": "Content-Length required"}, status_code=411)
        if not length.isdigit() or int(length) > self.config.max_upload_bytes:
            return JSONResponse({"detail": f"upload larger than {self.config.max_upload_bytes} bytes"},
                                status_code=413)
        return None


def create_app(classifier: Classifier, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(title="StableSDG line classifier", version=classifier.model_version,
                  docs_url=None, redoc_url=None, openapi_url=None)  # no schema browsing on a line PC

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict:
        info = classifier.describe()
        info.pop("path")  # the server's filesystem layout is nobody's business
        return info

    @app.post("/classify")
    def classify(files: Annotated[list[UploadFile], File()]) -> JSONResponse:
        # A sync endpoint runs in the threadpool; onnxruntime sessions are safe to share across threads.
        if len(files) > config.max_files:
            return JSONResponse({"detail": f"at most {config.max_files} files per request"}, status_code=413)
        names = [upload.filename or f"upload-{i}" for i, upload in enumerate(files)]
        predictions = classifier.classify([upload.file for upload in files], names=names)
        rows = [p.to_row() for p in predictions]
        failed = sum(not p.ok for p in predictions)
        # 422 when any upload is not a decodable image; the body still carries every file's result.
        status = 422 if failed else 200
        return JSONResponse({"model_version": classifier.model_version, "results": rows, "failed": failed},
                            status_code=status)

    app.add_middleware(GateMiddleware, config=config)
    return app
