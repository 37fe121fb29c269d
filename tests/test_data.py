"""Data ingest: layouts, split, quarantine of malformed files, read-only source, demo determinism."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablesdg.config import DataConfig, parse_params
from stablesdg.data import DataError, detect_layout, ingest, read_manifest, split_paths
from stablesdg.demo import demo_image, write_demo_dataset
from stablesdg.utils import sha256_tree

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
NEU_PREFIX = {"crazing": "Cr", "inclusion": "In", "patches": "Pa", "pitted_surface": "PS",
              "rolled-in_scale": "RS", "scratches": "Sc"}
SMALL = DataConfig(image_size=64, k_shot=3, val_per_class=2, test_per_class=3)


def _image(cls: str, i: int, mode: str = "L") -> Image.Image:
    return demo_image(cls, i, seed=7, size=80).convert(mode)


def _write_neu_cls(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    formats = [("bmp", "L"), ("png", "RGB"), ("jpg", "L"), ("tif", "RGB")]
    for cls in CLASSES:
        for i in range(n):
            ext, mode = formats[i % len(formats)]
            _image(cls, i, mode).save(root / f"{NEU_PREFIX[cls]}_{i + 1}.{ext}")


def _write_neu_det(root: Path, n: int) -> None:
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    for cls in CLASSES:
        for i in range(n):
            _image(cls, i, "RGB").save(root / "IMAGES" / f"{cls}_{i + 1}.jpg", quality=95)
            (root / "ANNOTATIONS" / f"{cls}_{i + 1}.xml").write_text(f"<annotation><name>{cls}</name></annotation>")


def _write_folders(root: Path, n: int) -> None:
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _image(cls, i).save(root / cls / f"img{i}.png")


@pytest.mark.parametrize(
    ("writer", "layout"), [(_write_neu_cls, "neu-cls"), (_write_neu_det, "neu-det"), (_write_folders, "folders")]
)
def test_each_layout_ingests_every_image_with_its_class(tmp_path, writer, layout):
    src = tmp_path / "src"
    writer(src, 8)
    assert detect_layout(src) == layout
    summary = ingest(src, tmp_path / "out", SMALL, CLASSES, seed=1)
    assert summary["layout"] == layout
    assert summary["images"] == 8 * len(CLASSES)
    assert summary["quarantined"] == 0
    rows = read_manifest(tmp_path / "out")
    assert {r["class"] for r in rows} == set(CLASSES)
    for row in rows:
        img = Image.open(tmp_path / "out" / row["path"])
        assert img.size == (64, 64) and img.mode == "L"
        assert row["path"].startswith(f"images/{row['class']}/")
        assert (row["width"], row["height"]) == ("80", "80")
        assert len(row["sha256"]) == 64


def test_colour_mode_keeps_three_channels(tmp_path):
    _write_folders(tmp_path / "src", 6)
    cfg = DataConfig(image_size=48, color_mode="RGB", k_shot=2, val_per_class=1, test_per_class=2)
    ingest(tmp_path / "src", tmp_path / "out", cfg, CLASSES, seed=0)
    path = split_paths(tmp_path / "out", "patches", "train")[0]
    assert Image.open(path).mode == "RGB" and Image.open(path).size == (48, 48)


def test_16_bit_tiff_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    _write_folders(src, 6)
    ramp = (np.linspace(0, 65535, 80 * 80).reshape(80, 80)).astype(np.uint16)
    Image.fromarray(ramp).save(src / "crazing" / "deep.tif")
    ingest(src, tmp_path / "out", SMALL, CLASSES, seed=0)
    row = next(r for r in read_manifest(tmp_path / "out") if r["source_file"] == "crazing/deep.tif")
    pixels = np.asarray(Image.open(tmp_path / "out" / row["path"]))
    assert pixels.min() < 10 and pixels.max() > 245  # full range survives, not all-white


def test_split_is_stratified_reproducible_and_disjoint(tmp_path):
    _write_folders(tmp_path / "src", 12)
    a = ingest(tmp_path / "src", tmp_path / "a", SMALL, CLASSES, seed=3)
    ingest(tmp_path / "src", tmp_path / "b", SMALL, CLASSES, seed=3)
    ingest(tmp_path / "src", tmp_path / "c", SMALL, CLASSES, seed=4)
    for cls in CLASSES:
        assert a["per_class"][cls] == {"train": 3, "val": 2, "test": 3, "pool": 4}
        splits = {s: [p.name for p in split_paths(tmp_path / "a", cls, s)] for s in ("train", "val", "test")}
        assert splits == {s: [p.name for p in split_paths(tmp_path / "b", cls, s)] for s in splits}
        assert not set(splits["train"]) & set(splits["test"])
        assert not set(splits["val"]) & set(splits["test"])
    differs = any(
        split_paths(tmp_path / "a", cls, "train") != split_paths(tmp_path / "c", cls, "train") for cls in CLASSES
    )
    assert differs, "a different seed must give a different split"


def test_split_ignores_file_names_and_order(tmp_path):
    _write_folders(tmp_path / "src", 10)
    ingest(tmp_path / "src", tmp_path / "a", SMALL, CLASSES, seed=5)
    for cls in CLASSES:  # rename every file: content-hash ordering keeps the same images in each split
        for p in sorted((tmp_path / "src" / cls).iterdir()):
            p.rename(p.with_name("renamed_" + p.name))
    ingest(tmp_path / "src", tmp_path / "b", SMALL, CLASSES, seed=5)
    for cls in CLASSES:
        sha = {r["path"]: r["sha256"] for r in read_manifest(tmp_path / "a")} | {
            r["path"]: r["sha256"] for r in read_manifest(tmp_path / "b")}
        train_a = sorted(sha[f"images/{cls}/{p.name}"] for p in split_paths(tmp_path / "a", cls, "train"))
        train_b = sorted(sha[f"images/{cls}/{p.name}"] for p in split_paths(tmp_path / "b", cls, "train"))
        assert train_a == train_b


# ------------------------------------------------------------------------------------------ malformed corpus
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _malformed_corpus(cls_dir: Path, other_dir: Path, root: Path) -> dict[str, str]:
    """Writes >= 20 kinds of bad files; returns {relative path: expected reason fragment}."""
    good = _png_bytes(_image("crazing", 99))
    jpeg = io.BytesIO()
    _image("crazing", 98).save(jpeg, format="JPEG")
    bmp = io.BytesIO()
    _image("crazing", 97).save(bmp, format="BMP")
    tif = io.BytesIO()
    _image("crazing", 96).save(tif, format="TIFF")
    rng = np.random.default_rng(0)
    bad = {
        "empty.png": (b"", "empty"),
        "empty.tif": (b"", "empty"),
        "truncated.png": (good[: len(good) // 2], "truncated"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 3], "truncated"),
        "truncated.bmp": (bmp.getvalue()[:200], "truncated"),
        "truncated.tif": (tif.getvalue()[:150], "truncated"),
        "text.png": (b"hello, I am not an image\n" * 10, "not an image"),
        "random.jpg": (rng.bytes(4096), "not an image"),
        "random.bmp": (b"BM" + rng.bytes(2000), "image"),
        "html.jpeg": (b"<html><body>404</body></html>", "not an image"),
        "gzip.png": (gzip.compress(good), "not an image"),
        "soi_only.jpg": (b"\xff\xd8", "image"),
        "bomb.png": (_png_header_only(60000, 60000), "decompression bomb"),
        "bigbomb.png": (_png_header_only(7000, 7000), "decompression bomb"),
        "header_only.png": (_png_header_only(100, 100), "truncated"),
        "notes.txt": (b"some notes", "unsupported extension"),
        "noext": (good, "unsupported extension"),
        "annotation.xml": (b"<xml/>", "unsupported extension"),
        "huge.png": (rng.bytes(300_000), "max_file_mb"),
        "zero_dims.png": (_png_header_only(0, 0), "image"),
    }
    expected = {}
    for name, (data, reason) in bad.items():
        (cls_dir / name).write_bytes(data)
        expected[f"{cls_dir.name}/{name}"] = reason
    (cls_dir / "dup_a.png").write_bytes(_png_bytes(_image("crazing", 50)))
    (cls_dir / "dup_b.png").write_bytes(_png_bytes(_image("crazing", 50)))
    expected[f"{cls_dir.name}/dup_b.png"] = "duplicate of"
    (other_dir / "conflict.png").write_bytes(_png_bytes(_image("crazing", 50)))
    expected[f"{other_dir.name}/conflict.png"] = "conflicting labels"
    (root / "unknown_class").mkdir()
    _image("patches", 60).save(root / "unknown_class" / "x.png")
    expected["unknown_class/x.png"] = "unknown class"
    _image("patches", 61).save(root / "stray_at_root.png")
    expected["stray_at_root.png"] = "no class"
    os.symlink(root / "does-not-exist.png", cls_dir / "broken_link.png")
    expected[f"{cls_dir.name}/broken_link.png"] = "broken symbolic link"
    return expected


def test_malformed_files_are_quarantined_and_valid_files_all_kept(tmp_path):
    src = tmp_path / "src"
    _write_folders(src, 8)
    expected = _malformed_corpus(src / "crazing", src / "patches", src)
    assert len(expected) >= 20
    before = sha256_tree(src)
    cfg = DataConfig(image_size=64, k_shot=3, val_per_class=2, test_per_class=3, max_pixels=40_000_000,
                     max_file_mb=0.25)
    summary = ingest(src, tmp_path / "out", cfg, CLASSES, seed=0)
    reasons = {r["file"]: r["reason"] for r in summary["rejected"]}
    for file, fragment in expected.items():
        assert file in reasons, f"{file} was not quarantined"
        assert fragment in reasons[file], f"{file}: {reasons[file]!r} lacks {fragment!r}"
    kept = {r["source_file"] for r in read_manifest(tmp_path / "out")}
    valid = {f"{c}/img{i}.png" for c in CLASSES for i in range(8)} | {"crazing/dup_a.png"}
    assert kept == valid
    assert summary["quarantined"] == len(expected)
    assert sha256_tree(src) == before, "the source folder must never be modified"


def test_class_without_valid_images_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    _write_folders(src, 4)
    for p in (src / "scratches").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DataError, match="no valid image for class.*scratches"):
        ingest(src, tmp_path / "out", SMALL, CLASSES, seed=0)


def test_missing_source_names_the_param(tmp_path):
    with pytest.raises(DataError, match="data.source"):
        ingest(tmp_path / "nope", tmp_path / "out", SMALL, CLASSES, seed=0)


def test_demo_is_deterministic_and_classes_differ(tmp_path):
    write_demo_dataset(tmp_path / "a", CLASSES, 3, 64, seed=11)
    write_demo_dataset(tmp_path / "b", CLASSES, 3, 64, seed=11)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    write_demo_dataset(tmp_path / "c", CLASSES, 3, 64, seed=12)
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "c")
    means = {c: np.asarray(demo_image(c, 0, 11, 128), dtype=float).std() for c in CLASSES}
    assert all(v > 3 for v in means.values()), means  # textured, not flat


def test_unknown_demo_class_is_refused(tmp_path):
    params = parse_params({"classes": {"dent": {}, "crazing": {}}})
    with pytest.raises(ValueError, match="demo generator knows only"):
        write_demo_dataset(tmp_path, params.class_names, 2, 32, 0)


def test_quarantine_report_is_json_serialisable(tmp_path):
    src = tmp_path / "src"
    _write_folders(src, 6)
    (src / "crazing" / "bad.png").write_bytes(b"nope")
    summary = ingest(src, tmp_path / "out", SMALL, CLASSES, seed=0)
    json.dumps(summary)
    reason = "not an image (cannot identify the format; allowed by content: png, jpeg, bmp, tiff, webp)"
    assert summary["rejected"] == [{"file": "crazing/bad.png", "reason": reason}]
