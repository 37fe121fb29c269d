"""The review folder: copies of the images the line was unsure of, for a person to label (issue 25).

An image is kept when its top-1 probability is below `below` or its top-2 margin (top-1 minus top-2
probability) is below `margin_below`. Only images the model classified are candidates: a file the runtime
refused (not an image, too large, cut short...) never lands here. Each image comes with a sidecar JSON (same
stem) naming its prediction, scores, margin, model version and sha256, the line and the time; `stablesdg data
review-import` reads them back. Names start with the time in nanoseconds, so the oldest sort first and go
first when the folder is over its cap (files or bytes). The same image twice (content sha256) is kept once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from PIL import Image

from .classifier import Prediction

log = logging.getLogger("stablesdg_line.review")

DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_MB = 500.0
SIDECAR = ".json"
KNOWN_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ReviewConfigError(ValueError):
    """The review options cannot work as given."""


@dataclass(frozen=True)
class ReviewPolicy:
    below: float | None = None  # keep when the top-1 probability is below this
    margin_below: float | None = None  # keep when top-1 minus top-2 is below this
    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = int(DEFAULT_MAX_MB * 1024 * 1024)

    def __post_init__(self) -> None:
        if self.below is None and self.margin_below is None:
            raise ReviewConfigError("a review folder needs --review-below and/or --review-margin")
        if self.max_files < 1 or self.max_bytes < 1:
            raise ReviewConfigError("the review folder's cap must be at least one file and one byte")


def top2_margin(scores: dict[str, float]) -> float:
    ranked = sorted(scores.values(), reverse=True)
    return ranked[0] - ranked[1] if len(ranked) > 1 else 1.0


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _read(source: str | Path | IO[bytes]) -> bytes:
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


class ReviewFolder:
    """Thread-safe within one process (serve's worker threads share one)."""

    def __init__(self, directory: Path, policy: ReviewPolicy, line: str | None = None):
        self.directory, self.policy = Path(directory), policy
        self.line = line or socket.gethostname()
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    def unsure(self, prediction: Prediction) -> bool:
        if not prediction.ok or prediction.confidence is None:
            return False  # refused by the runtime: nothing to learn from, never kept
        p = self.policy
        return ((p.below is not None and prediction.confidence < p.below)
                or (p.margin_below is not None and top2_margin(prediction.scores) < p.margin_below))

    def keep_all(self, predictions: Sequence[Prediction], sources: Sequence[str | Path | IO[bytes]],
                 model_sha256: str = "") -> int:
        """Keep the unsure ones of a batch (sources in the predictions' order); returns how many were kept.
        A file that cannot be read again or stored is logged and skipped: review never fails a request."""
        kept = 0
        for prediction, source in zip(predictions, sources, strict=True):
            if not self.unsure(prediction):
                continue
            try:
                kept += self.keep(prediction, _read(source), model_sha256) is not None
            except OSError as err:
                log.warning("could not keep %s for review: %s", prediction.file, err)
        return kept

    def tap(self, predictions: Iterable[Prediction], model_sha256: str = "") -> Iterator[Prediction]:
        """Pass predictions of files on disk through, keeping the unsure ones (classify)."""
        for prediction in predictions:
            self.keep_all([prediction], [prediction.file], model_sha256)
            yield prediction

    def keep(self, prediction: Prediction, data: bytes, model_sha256: str = "") -> Path | None:
        if len(data) > self.policy.max_bytes:
            return None
        sha = hashlib.sha256(data).hexdigest()
        suffix = _suffix(data, prediction.file)
        with self._lock:
            entries = self._entries()
            if any(stem.endswith(sha[:16]) for stem in entries):
                return None  # already waiting for review
            stem = f"{time.time_ns():020d}-{sha[:16]}"
            image = self.directory / f"{stem}{suffix}"
            self._write(image, data)
            self._write(self.directory / f"{stem}{SIDECAR}", json.dumps(
                {"image": image.name, "source_file": Path(prediction.file).name, "sha256": sha,
                 "class": prediction.label, "confidence": prediction.confidence,
                 "margin": top2_margin(prediction.scores), "scores": prediction.scores,
                 "model_version": prediction.model_version, "model_sha256": model_sha256,
                 "line": self.line, "saved_at": _now_iso()}, indent=2).encode())
            entries[stem] = [image, self.directory / f"{stem}{SIDECAR}"]
            self._enforce_cap(entries)
        return image

    def _entries(self) -> dict[str, list[Path]]:
        """stem -> its files (image and sidecar); temporary files are not entries."""
        entries: dict[str, list[Path]] = {}
        with os.scandir(self.directory) as listing:
            for entry in listing:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                entries.setdefault(entry.name.split(".", 1)[0], []).append(Path(entry.path))
        return entries

    def _enforce_cap(self, entries: dict[str, list[Path]]) -> None:
        sizes = {stem: sum(_size(path) for path in paths) for stem, paths in entries.items()}
        total = sum(sizes.values())
        for stem in sorted(entries)[:-1]:  # oldest first; the newest is never its own victim
            if len(entries) <= self.policy.max_files and total <= self.policy.max_bytes:
                break
            for path in sorted(entries[stem], key=lambda p: p.suffix == SIDECAR):  # sidecar last
                path.unlink(missing_ok=True)
            total -= sizes[stem]
            del entries[stem]

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Complete or absent: a reader (review-import) never sees half a file."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def _suffix(data: bytes, name: str) -> str:
    """The upload's own suffix, else the one its content says (an upload may have no name): ingest and
    review-import read images by suffix."""
    suffix = Path(name).suffix.lower()
    if suffix in KNOWN_SUFFIXES:
        return suffix
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only
            found = f".{(image.format or '').lower()}"
    except Exception:  # noqa: BLE001 - it was decoded once already; any doubt keeps the neutral name
        return ".img"
    return {".jpeg": ".jpg", ".tiff": ".tif"}.get(found, found if found in KNOWN_SUFFIXES else ".img")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def add_review_options(parser) -> None:
    group = parser.add_argument_group("review folder (images the model is unsure of)")
    group.add_argument("--review-dir", type=Path, help="keep unsure images here, each with a sidecar JSON")
    group.add_argument("--review-below", type=float, metavar="P",
                       help="keep an image whose top-1 probability is below P (e.g. 0.6)")
    group.add_argument("--review-margin", type=float, metavar="M",
                       help="keep an image whose top-1 minus top-2 probability is below M")
    group.add_argument("--review-max-files", type=int, default=DEFAULT_MAX_FILES,
                       help=f"cap: most images kept, oldest go first (default {DEFAULT_MAX_FILES})")
    group.add_argument("--review-max-mb", type=float, default=DEFAULT_MAX_MB,
                       help=f"cap: most megabytes kept, oldest go first (default {DEFAULT_MAX_MB:g})")
    group.add_argument("--line-id", help="the line's name in each sidecar (default: the host name)")


def review_from_args(args) -> ReviewFolder | None:
    if args.review_dir is None:
        if args.review_below is not None or args.review_margin is not None:
            raise ReviewConfigError("--review-below / --review-margin need --review-dir")
        return None
    policy = ReviewPolicy(args.review_below, args.review_margin, args.review_max_files,
                          int(args.review_max_mb * 1024 * 1024))
    return ReviewFolder(args.review_dir, policy, args.line_id)
