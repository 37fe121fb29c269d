"""Data ingest: any supported folder layout -> normalised images, a manifest, a seeded stratified split.

Layouts: NEU-CLS (flat `Cr_1.bmp`, `In_*`, `Pa_*`, `PS_*`, `RS_*`, `Sc_*`), NEU-DET (`IMAGES/crazing_1.jpg` with
`ANNOTATIONS/*.xml`, class from the file name) and class-per-folder. Every file that cannot be used goes into a
quarantine report with its reason; the rest of the batch goes on. The source folder is only ever read.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import struct
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import DataConfig
from .utils import read_json, write_json

IMAGE_EXTENSIONS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
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


class DataError(ValueError):
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


# --------------------------------------------------------------------------------------- decoding
def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled to 8 bit by its range (PIL's convert('L') would clip)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    return img


def decode_image(path: Path, cfg: DataConfig) -> Image.Image:
    """Open, fully decode and normalise one image; raises ValueError with a reason a person understands."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    if size > cfg.max_file_mb * 1024 * 1024:
        raise ValueError(f"file is {size / 2**20:.1f} MB, over data.max_file_mb={cfg.max_file_mb}")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported extension {path.suffix or '(none)'}; use one of {sorted(IMAGE_EXTENSIONS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ValueError(f"image has zero size {width}x{height}")
                if width * height > cfg.max_pixels:
                    raise ValueError(
                        f"decompression bomb: {width}x{height} exceeds data.max_pixels={cfg.max_pixels}"
                    )
                img.seek(0)  # multi-frame TIFF/GIF: the first frame is the image
                img.load()
                img = _to_8bit(img)
                converted = img.convert(cfg.color_mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, EOFError, struct.error) as err:
        raise ValueError(f"unreadable or truncated image: {err}") from None
    return converted.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)


# --------------------------------------------------------------------------------------- ingest
def ingest(source: Path, out_dir: Path, cfg: DataConfig, classes: list[str], seed: int) -> dict:
    """Normalise `source` into `out_dir`; returns a summary (counts, quarantine) for reports and MLflow."""
    if not source.is_dir():
        raise DataError(f"data.source: folder {source} not found; point data.source at your image folder")
    layout = detect_layout(source) if cfg.layout == "auto" else cfg.layout
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    records, rejected = _normalise_all(list_candidates(source, layout), source, out_dir, cfg, set(classes))
    empty = [c for c in classes if not any(r.cls == c for r in records)]
    if empty:
        raise DataError(
            f"no valid image for class(es) {', '.join(empty)} in {source} (layout {layout}); "
            f"{len(rejected)} file(s) quarantined - see the quarantine report. Add images or remove the class "
            "from `classes` in params.yaml."
        )
    assign_splits(records, cfg, seed)
    _write_outputs(out_dir, records, classes)
    return {
        "layout": layout,
        "source": str(source),
        "images": len(records),
        "quarantined": len(rejected),
        "per_class": {c: _split_counts([r for r in records if r.cls == c]) for c in classes},
        "rejected": [asdict(r) for r in rejected],
    }


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
        except ValueError as err:
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
    if cand.source.is_symlink() and not cand.source.exists():
        raise ValueError("broken symbolic link")
    raw = cand.source.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest in seen:
        first = seen[digest]
        if first.cls != cand.label:
            raise ValueError(f"same bytes as {first.source_file} labelled {first.cls}: conflicting labels")
        raise ValueError(f"duplicate of {first.source_file}")
    image = decode_image(cand.source, cfg)
    with Image.open(cand.source) as probe:
        width, height = probe.size
    name = f"images/{cand.label}/{cand.source.stem}_{digest[:8]}.png"
    (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    image.save(out_dir / name)
    return Record(name, cand.label, digest, rel, width, height)


def _split_counts(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.split for r in records)
    return {s: counts[s] for s in (*SPLITS, "pool") if counts[s]}


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
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for r in records:
            writer.writerow([r.path, r.cls, r.split, r.sha256, r.source_file, r.width, r.height])
    (out_dir / "splits").mkdir(exist_ok=True)
    for cls in classes:
        split = {s: [r.path for r in records if r.cls == cls and r.split == s] for s in (*SPLITS, "pool")}
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


def read_manifest(processed_dir: str | Path) -> list[dict]:
    with open(Path(processed_dir) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def contact_sheet(processed_dir: Path, classes: list[str], per_class: int = 6) -> Image.Image:
    """A few training images per class as one labelled PNG grid."""
    from .viz import image_grid

    rows = []
    for cls in classes:
        paths = split_paths(processed_dir, cls, "train")[:per_class]
        rows.append([Image.open(p).copy() for p in paths])
    return image_grid(rows, classes)
