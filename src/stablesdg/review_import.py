"""The line's doubts back into the data (issue 25): labelled images from a line PC's review folder are added
to the (DVC-tracked, class-per-folder) source folder, with a manifest naming where each came from.

The review folder is what `stablesdg-line serve|classify|watch --review-dir` writes: each image has a sidecar
JSON (same stem) with the line, the model version, its prediction and the time. A person labels them either
in a CSV (`image,label`) or by sorting the images into `REVIEW_DIR/<class>/` folders (sidecars found again
by the image's sha256, wherever they are in REVIEW_DIR).

Rules:
- an image whose bytes (sha256) are already in the source folder, or twice in the review, is refused;
- a label that is not one of the classes is refused;
- imported images never enter an experiment's test split unless asked (`allow_test`): the manifest marks
  them `train-only`, and `ingest` gives them the `line` split (classifier training), outside the seeded
  permutation that splits the other images, so the existing train/val/test split stays as it was.

Writes `SOURCE/<class>/line-<sha16><suffix>` and appends to `SOURCE/.review-imports/manifest.csv` (a dot
folder: the folder layout does not read it as a class).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .data import REVIEW_MANIFEST, DataError
from .decoding import IMAGE_EXTENSIONS

MANIFEST = REVIEW_MANIFEST
MANIFEST_FIELDS = ["path", "class", "sha256", "policy", "line", "model_version", "model_sha256",
                   "predicted", "confidence", "margin", "saved_at", "imported_at", "review_file"]
TRAIN_ONLY, ANY_SPLIT = "train-only", "any"


@dataclass(frozen=True)
class Labelled:
    image: Path
    label: str
    sidecar: dict


@dataclass
class ImportSummary:
    added: list[str] = field(default_factory=list)  # paths relative to the source folder
    refused: list[dict] = field(default_factory=list)  # {"file", "reason"}

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecars(review_dir: Path) -> dict[str, dict]:
    """sha256 -> sidecar, for every sidecar in the review folder (sorted or not)."""
    found = {}
    for path in sorted(review_dir.rglob("*.json")):
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(sidecar, dict) and isinstance(sidecar.get("sha256"), str):
            found[sidecar["sha256"]] = sidecar
    return found


def _images(folder: Path) -> list[Path]:
    suffixes = {*IMAGE_EXTENSIONS, ".img"}  # .img: the review folder's name for an unknown suffix
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def labelled_from_csv(review_dir: Path, labels_csv: Path) -> list[Labelled]:
    sidecars = _sidecars(review_dir)
    try:
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise DataError(f"cannot read --labels {labels_csv}: {err}") from err
    if rows and not {"image", "label"} <= set(rows[0]):
        raise DataError(f"{labels_csv}: needs the columns image,label (got {', '.join(rows[0])})")
    items = []
    for row in rows:
        image = review_dir / (row["image"] or "").strip()
        label = (row["label"] or "").strip()
        if label and image.is_file():
            items.append(Labelled(image, label, sidecars.get(sha256_file(image), {})))
        elif label:
            items.append(Labelled(image, label, {}))  # refused later: file not found
    return items


def labelled_from_folders(review_dir: Path) -> list[Labelled]:
    sidecars = _sidecars(review_dir)
    return [Labelled(image, folder.name, sidecars.get(sha256_file(image), {}))
            for folder in sorted(p for p in review_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            for image in _images(folder)]


def _existing_hashes(source: Path) -> set[str]:
    return {sha256_file(p) for p in source.rglob("*")
            if p.is_file() and not p.is_symlink() and MANIFEST.parts[0] not in p.relative_to(source).parts}


def _manifest_row(item: Labelled, rel: str, sha: str, allow_test: bool, now: str) -> dict:
    side = item.sidecar
    return {"path": rel, "class": item.label, "sha256": sha, "policy": ANY_SPLIT if allow_test else TRAIN_ONLY,
            "line": side.get("line", "unknown"), "model_version": side.get("model_version", "unknown"),
            "model_sha256": side.get("model_sha256", ""), "predicted": side.get("class", ""),
            "confidence": side.get("confidence", ""), "margin": side.get("margin", ""),
            "saved_at": side.get("saved_at", ""), "imported_at": now, "review_file": item.image.name}


def import_reviewed(items: Iterable[Labelled], source: Path, classes: Iterable[str],
                    allow_test: bool = False) -> ImportSummary:
    """Copy the labelled images into SOURCE/<class>/ and append their manifest rows; the review folder is
    only read. Refusals are listed with the reason; the rest goes on."""
    classes = set(classes)
    if not source.is_dir():
        raise DataError(f"source folder {source} not found (data.source in params.yaml)")
    if not any((source / c).is_dir() for c in classes):
        raise DataError(f"{source} is not a class-per-folder source (no {'/, '.join(sorted(classes))}/ "
                        "folder): review-import adds to SOURCE/<class>/")
    known = _existing_hashes(source)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary, rows = ImportSummary(), []
    for item in items:
        reason, sha = _refusal(item, classes, known)
        if reason:
            summary.refused.append({"file": str(item.image), "reason": reason})
            continue
        rel = f"{item.label}/line-{sha[:16]}{item.image.suffix.lower()}"
        (source / item.label).mkdir(exist_ok=True)
        shutil.copyfile(item.image, source / rel)
        known.add(sha)
        summary.added.append(rel)
        rows.append(_manifest_row(item, rel, sha, allow_test, now))
    _append_manifest(source / MANIFEST, rows)
    return summary


def _refusal(item: Labelled, classes: set[str], known: set[str]) -> tuple[str | None, str]:
    if not item.image.is_file():
        return f"{item.image} not found in the review folder", ""
    if item.label not in classes:
        return f"label {item.label!r} is not a class ({', '.join(sorted(classes))})", ""
    sha = sha256_file(item.image)
    if sha in known:
        return f"duplicate: the same bytes (sha256 {sha[:16]}) are already in the source folder", sha
    return None, sha


def _append_manifest(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_manifest(source: Path) -> list[dict]:
    path = source / MANIFEST
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

