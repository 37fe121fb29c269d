"""Data ingest: any supported folder layout -> normalised images, a manifest, a seeded stratified split.

Layouts: NEU-CLS (flat `Cr_1.bmp`, `In_*`, `Pa_*`, `PS_*`, `RS_*`, `Sc_*`), NEU-DET (`IMAGES/crazing_1.jpg` with
`ANNOTATIONS/*.xml`, class from the file name) and class-per-folder. Every file that cannot be used goes into a
quarantine report with its reason; the rest of the batch goes on. The source folder is only ever read. Reading and
decoding one file, with the parse-cost limits: decoding.py.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .config import DataConfig
from .decoding import IMAGE_EXTENSIONS, decode_image_bytes, read_source_file
from .errors import StableSDGError
from .utils import read_json, write_json
from .viz import image_grid

NEU_CLS_PREFIXES = {
    "cr": "crazing",
    "in": "inclusion",
    "pa": "patches",
    "ps": "pitted_surface",
    "rs": "rolled-in_scale",
    "sc": "scratches",
}
MANIFEST_FIELDS = ["path", "class", "split", "sha256", "source_file", "width", "height"]
SPLITS = ("train", "val", "test")
# Images a person labelled from the line's review folder (review_import.py): classifier training only, kept
# out of the seeded permutation so that importing them leaves every other image's split as it was.
LINE_SPLIT = "line"
ALL_SPLITS = (*SPLITS, "pool", LINE_SPLIT)
REVIEW_MANIFEST = Path(".review-imports") / "manifest.csv"  # in the source folder; a dot folder is no class


class DataError(StableSDGError, ValueError):
    """The source data cannot be used as a whole (missing folder, no valid image in a class, ...)."""


@dataclass
class Candidate:
    source: Path
    label: str | None  # None: the layout could not tell the class


@dataclass
class Record:
    path: str
    cls: str
    sha256: str
    source_file: str
    width: int
    height: int
    split: str = ""


@dataclass
class Rejection:
    file: str
    reason: str


# --------------------------------------------------------------------------------------- layouts
def detect_layout(source: Path) -> str:
    if (source / "IMAGES").is_dir():
        return "neu-det"
    if any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir()):
        return "folders"
    return "neu-cls"


def _neu_cls_label(name: str) -> str | None:
    match = re.match(r"^([A-Za-z]{2})_", name)
    return NEU_CLS_PREFIXES.get(match.group(1).lower()) if match else None


def _neu_det_label(stem: str) -> str | None:
    match = re.match(r"^(.+?)_\d+$", stem)
    return match.group(1) if match else None


def list_candidates(source: Path, layout: str) -> list[Candidate]:
    """Every file the layout says belongs to the dataset, with the class it names (or None)."""
    if layout == "neu-det":
        files = sorted(p for p in (source / "IMAGES").rglob("*") if not p.is_dir())
        return [Candidate(p, _neu_det_label(p.stem)) for p in files]
    if layout == "neu-cls":
        return [Candidate(p, _neu_cls_label(p.name)) for p in sorted(source.iterdir()) if not p.is_dir()]
    candidates = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        candidates += [Candidate(p, folder.name) for p in sorted(folder.rglob("*")) if not p.is_dir()]
    candidates += [Candidate(p, None) for p in sorted(source.iterdir()) if not p.is_dir()]
    return candidates


# --------------------------------------------------------------------------------------- ingest
def data_metrics(summary: dict) -> dict[str, int]:
    """What metrics/data.json declares to DVC: the totals. Per-class split counts would add a column per class
    and split to `dvc exp show`; they stay in reports/data/summary.json."""
    return {"images": summary["images"], "quarantined": summary["quarantined"]}


def ingest(source: Path, out_dir: Path, cfg: DataConfig, classes: list[str], seed: int) -> dict:
    """Normalise `source` into `out_dir`; returns a summary (counts, quarantine) for reports and MLflow."""
    if not source.is_dir():
        raise DataError(f"data.source: folder {source} not found; point data.source at your image folder")
    layout = detect_layout(source) if cfg.layout == "auto" else cfg.layout
    # Built next to the old output and swapped in only when complete: a failed or interrupted ingest leaves
    # the previous data/processed as it was.
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    try:
        records, rejected = _normalise_all(list_candidates(source, layout), source, staging, cfg, set(classes))
        empty = [c for c in classes if not any(r.cls == c for r in records)]
        if empty:
            raise DataError(
                f"no valid image for class(es) {', '.join(empty)} in {source} (layout {layout}); "
                f"{len(rejected)} file(s) quarantined - see the quarantine report. Add images or remove the "
                "class from `classes` in params.yaml."
            )
        line_only = train_only_paths(source)
        assign_splits([r for r in records if r.source_file not in line_only], cfg, seed)
        for record in records:
            if record.source_file in line_only:
                record.split = LINE_SPLIT
        _write_outputs(staging, records, classes)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno in DISK_FULL_ERRNOS:
            raise _disk_full(out_dir, source) from err
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out_dir)
    return {
        "layout": layout,
        "source": str(source),
        "images": len(records),
        "quarantined": len(rejected),
        "per_class": {c: _split_counts([r for r in records if r.cls == c]) for c in classes},
        "rejected": [asdict(r) for r in rejected],
    }


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(out_dir: Path, source: Path) -> DataError:
    """The output's fault, named with the space it would need (about the source's size) and what is free."""
    needed = sum(p.stat().st_size for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else ".").free
    return DataError(f"no space left on the device of {out_dir.parent}: ingest needs about {needed / 2**20:.1f} "
                     f"MB free there (the source's size), {free / 2**20:.1f} MB are free. The previous "
                     f"{out_dir} is kept; free space and run again")


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by the complete staging folder with two renames (same parent, same filesystem)."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists() or out_dir.is_symlink():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _normalise_all(
    candidates: list[Candidate], source: Path, out_dir: Path, cfg: DataConfig, classes: set[str]
) -> tuple[list[Record], list[Rejection]]:
    records: list[Record] = []
    rejected: list[Rejection] = []
    seen: dict[str, Record] = {}
    for cand in tqdm(candidates, desc="ingest", unit="img"):
        rel = cand.source.relative_to(source).as_posix()
        try:
            record = _normalise_one(cand, rel, out_dir, cfg, classes, seen)
        except OSError as err:
            if err.errno in DISK_FULL_ERRNOS:  # the output is full: no image is to blame
                raise
            rejected.append(Rejection(rel, f"cannot read file: {err}"))
            continue
        except ValueError as err:  # per-file problems are quarantined, never fatal
            rejected.append(Rejection(rel, str(err)))
            continue
        seen[record.sha256] = record
        records.append(record)
    return records, rejected


def _normalise_one(
    cand: Candidate, rel: str, out_dir: Path, cfg: DataConfig, classes: set[str], seen: dict[str, Record]
) -> Record:
    if cand.label is None:
        raise ValueError("the layout gives no class for this file (name or folder not recognised)")
    if cand.label not in classes:
        raise ValueError(f"unknown class {cand.label!r}; known classes: {', '.join(sorted(classes))}")
    if cand.source.suffix.lower() not in IMAGE_EXTENSIONS:
        suffix = cand.source.suffix or "(none)"
        raise ValueError(f"unsupported extension {suffix}; use one of {sorted(IMAGE_EXTENSIONS)}")
    raw = read_source_file(cand.source, cfg)
    digest = hashlib.sha256(raw).hexdigest()
    if digest in seen:
        first = seen[digest]
        if first.cls != cand.label:
            raise ValueError(f"same bytes as {first.source_file} labelled {first.cls}: conflicting labels")
        raise ValueError(f"duplicate of {first.source_file}")
    image, (width, height) = decode_image_bytes(raw, cand.source.suffix, cfg)
    name = f"images/{cand.label}/{_portable_stem(cand.source.stem)}_{digest[:8]}.png"
    (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    image.save(out_dir / name)
    return Record(name, cand.label, digest, rel, width, height)


def train_only_paths(source: Path) -> set[str]:
    """Source-relative paths of imported line images not allowed into the test split (their manifest's
    policy is not `any`)."""
    manifest = source / REVIEW_MANIFEST
    if not manifest.is_file():
        return set()
    with manifest.open(newline="", encoding="utf-8") as handle:
        return {row["path"] for row in csv.DictReader(handle) if row.get("policy") != "any"}


def _portable_stem(stem: str) -> str:
    """The source name for the output file, with bytes that are not UTF-8 (surrogate-escaped by Python) as
    '_': the manifest and every later stage can then write and read it as text."""
    raw = stem.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace").replace("\ufffd", "_")


def _split_counts(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.split for r in records)
    return {s: counts[s] for s in ALL_SPLITS if counts[s]}


def split_sizes(n: int, cfg: DataConfig) -> tuple[int, int, int]:
    """(train, val, test) counts for a class of n images: k-shot train first, then test, then val."""
    train = min(cfg.k_shot, max(1, n - 2)) if n >= 3 else n
    rest = n - train
    test = min(cfg.test_per_class, rest - min(cfg.val_per_class, rest // 2))
    val = min(cfg.val_per_class, rest - test)
    return train, val, test


def assign_splits(records: list[Record], cfg: DataConfig, seed: int) -> None:
    """Stratified, seeded split; ordering by content hash makes it independent of file names and order."""
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[r.cls].append(r)
    for cls, items in by_class.items():
        items.sort(key=lambda r: r.sha256)
        rng = np.random.default_rng(int(hashlib.sha256(f"{seed}:{cls}".encode()).hexdigest()[:15], 16))
        order = rng.permutation(len(items))
        train, val, test = split_sizes(len(items), cfg)
        bounds = {"train": train, "val": train + val, "test": train + val + test}
        for rank, idx in enumerate(order):
            items[idx].split = next((s for s in SPLITS if rank < bounds[s]), "pool")


def _write_outputs(out_dir: Path, records: list[Record], classes: list[str]) -> None:
    records.sort(key=lambda r: (r.cls, r.path))
    # source_file keeps a non-UTF-8 source name as its backslash escape (readable, and the row is kept)
    with open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for r in records:
            writer.writerow([r.path, r.cls, r.split, r.sha256, r.source_file, r.width, r.height])
    (out_dir / "splits").mkdir(exist_ok=True)
    for cls in classes:
        split = {s: [r.path for r in records if r.cls == cls and r.split == s] for s in ALL_SPLITS}
        write_json(out_dir / "splits" / f"{cls}.json", split)


# --------------------------------------------------------------------------------------- readers
def class_names_in(processed_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(processed_dir) / "splits").glob("*.json"))


def split_paths(processed_dir: str | Path, class_name: str, split: str) -> list[Path]:
    """Absolute, sorted image paths of one class's split (train, val, test or pool)."""
    processed_dir = Path(processed_dir)
    split_file = processed_dir / "splits" / f"{class_name}.json"
    if not split_file.exists():
        raise DataError(f"{split_file} not found: run `dvc repro ingest` (or `stablesdg data ingest`) first")
    return sorted((processed_dir / rel).resolve() for rel in read_json(split_file).get(split, []))


def heldout_paths(processed_dir: str | Path, class_name: str) -> list[Path]:
    """The class's real images that are neither train nor test (val + pool): the search's FID reference."""
    return sorted([*split_paths(processed_dir, class_name, "val"), *split_paths(processed_dir, class_name, "pool")])


def synthetic_paths(synthetic_dir: str | Path, class_name: str) -> list[Path]:
    """The class's generated images (`<synthetic_dir>/<class>/`, any image suffix), sorted; [] if none."""
    folder = Path(synthetic_dir) / class_name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_manifest(processed_dir: str | Path) -> list[dict]:
    with open(Path(processed_dir) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def contact_sheet(processed_dir: Path, classes: list[str], per_class: int = 6) -> Image.Image:
    """A few training images per class as one labelled PNG grid."""
    rows = []
    for cls in classes:
        paths = split_paths(processed_dir, cls, "train")[:per_class]
        rows.append([Image.open(p).copy() for p in paths])
    return image_grid(rows, classes)
