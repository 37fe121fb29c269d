"""The standing bad-input corpus (issue 14): malformed and hostile files, generated, shared by every channel.

`write_corpus(folder)` writes every case and returns them; each case says which word the per-file error
must contain on the line (`classify`, `watch`, HTTP) and at ingest (`stablesdg data ingest`). The same folder
also gets valid files in unusual encodings, which every channel must still classify / keep.

Used by deploy/tests/test_bad_input_corpus.py (classify, watch, HTTP) and tests/test_ingest_corpus.py
(ingest).
"""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


@dataclass(frozen=True)
class Case:
    name: str
    line: str  # word(s) the line runtime's per-file error contains
    ingest: str  # word(s) the ingest quarantine reason contains
    kind: str = "file"  # file: bytes on disk (all channels); special: FIFO/link/permission (no HTTP upload)
    watch: str | None = None  # watch differs: "ignored" (documented: left alone, logged once at -v)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + idat + _png_chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noisy(size: int = 96) -> Image.Image:
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", 8 + 16) + b"\0" * 16 + ifd


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("image.png", b"not really")
    return buffer.getvalue()


def malformed_bytes() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, line reason word, ingest reason word) for cases that are plain file contents."""
    png, jpg = _encode(noisy(), "PNG"), _encode(noisy(), "JPEG", quality=90)
    bad_crc = bytearray(png)
    bad_crc[png.index(b"IDAT") + 40] ^= 0xFF
    gif = _encode(Image.new("P", (8, 8)), "GIF")
    return {
        "empty.png": (b"", "empty file", "empty file"),
        "truncated.png": (png[:3000], "cannot decode image data", "truncated"),
        "truncated.jpg": (jpg[:1500], "cannot decode image data", "truncated"),
        "truncated.bmp": (_encode(noisy(), "BMP")[:5000], "cannot decode image data", "truncated"),
        "truncated.tif": (_encode(noisy(), "TIFF")[:5000], "cannot decode image data", "truncated"),
        "truncated.webp": (_encode(noisy(), "WEBP", quality=90)[:400], "cannot", "truncated"),
        "bad_crc.png": (bytes(bad_crc), "cannot decode image data", "truncated"),
        "text_renamed.png": (b"shift report, not an image\n" * 20, "not a recognised image", "not an image"),
        "random.jpg": (np.random.default_rng(1).bytes(4096), "not a recognised image", "not an image"),
        "html.jpg": (b"<!doctype html><html><body>login</body></html>", "not a recognised image",
                     "not an image"),
        "eps_renamed.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
                            "not a recognised image", "not an image"),
        "gif_renamed.png": (gif, "not a recognised image", "not an image"),
        "pdf_renamed.jpg": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "not a recognised image",
                            "not an image"),
        "psd_renamed.tif": (b"8BPS\x00\x01" + b"\x00" * 200, "not a recognised image", "not an image"),
        "svg_renamed.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                            "not a recognised image", "not an image"),
        "gzip_renamed.png": (gzip.compress(png), "not a recognised image", "not an image"),
        "zip_renamed.tif": (_zip_bytes(), "not a recognised image", "not an image"),
        "zeros.bmp": (b"\x00" * 1000, "not a recognised image", "not an image"),
        "wrong_magic.png": (b"\x88" + png[1:], "not a recognised image", "not an image"),
        "wrong_magic.jpg": (b"\x00\x00" + jpg[2:], "not a recognised image", "not an image"),
        "pil_bomb.png": (png_header_only(100_000, 100_000), "bomb", "bomb"),
        "over_limit.png": (png_header_only(7_000, 7_000), "above the limit", "exceeds data.max_pixels"),
        "zero_width.png": (png_header_only(0, 16), "not a recognised image", "not an image"),
        "header_only.png": (png[:33], "not a recognised image", "not an image"),
        "bomb.tif": (_tiff_header(100_000, 100_000), "bomb", "bomb"),
        "bomb.bmp": (_bmp_header(60_000, 60_000), "bomb", "bomb"),
    }


def valid_unusual() -> dict[str, bytes]:
    """Valid images in encodings a line camera or an export can produce: each must be classified."""
    gradient16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    img = noisy(48)
    float_plane = np.linspace(-3.0, 7.0, 48 * 48, dtype=np.float32).reshape(48, 48)
    float_plane[0, 0] = np.nan
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 10, 10), (10, 10, 200))]
    multi = io.BytesIO()
    frames[0].save(multi, "TIFF", save_all=True, append_images=frames[1:])
    return {
        "ok_rgb.png": _encode(img, "PNG"),
        "ok_16bit.png": _encode(Image.fromarray(gradient16), "PNG"),
        "ok_16bit.tif": _encode(Image.fromarray(gradient16), "TIFF"),
        "ok_cmyk.jpg": _encode(img.convert("CMYK"), "JPEG", quality=95),
        "ok_palette.png": _encode(img.convert("P"), "PNG"),
        "ok_rgba.png": _encode(img.convert("RGBA"), "PNG"),
        "ok_la.png": _encode(img.convert("LA"), "PNG"),
        "ok_1bit.bmp": _encode(img.convert("1"), "BMP"),
        "ok_float_nan.tif": _encode(Image.fromarray(float_plane, "F"), "TIFF"),
        "ok_progressive.jpg": _encode(img, "JPEG", progressive=True, quality=90),
        "ok_gray.webp": _encode(img.convert("L"), "WEBP", lossless=True),
        "ok_multiframe.tif": multi.getvalue(),
    }


def write_corpus(folder: Path, sparse_mb: int = 70) -> tuple[list[Case], list[str]]:
    """Every case into `folder` (flat); returns (cases, names of the valid files written alongside)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (data, line, ingest) in malformed_bytes().items():
        (folder / name).write_bytes(data)
        cases.append(Case(name, line, ingest))
    os.mkfifo(folder / "camera_pipe.png")
    cases.append(Case("camera_pipe.png", "not a regular file (FIFO)", "not a regular file (FIFO)", "special",
                      watch="ignored"))
    os.symlink("/dev/zero", folder / "dev_zero.png")
    cases.append(Case("dev_zero.png", "not a regular file (character device)",
                      "not a regular file (character device)", "special", watch="ignored"))
    os.symlink(folder / "no-such-target.png", folder / "broken_link.png")
    cases.append(Case("broken_link.png", "broken symbolic link", "broken symbolic link", "special",
                      watch="ignored"))
    unreadable = folder / "unreadable.png"
    unreadable.write_bytes(_encode(noisy(), "PNG"))
    unreadable.chmod(0)
    cases.append(Case("unreadable.png", "Permission denied", "Permission denied", "special"))
    with (folder / "huge_sparse.png").open("wb") as handle:  # 70 MB of nothing, over data.max_file_mb (64)
        handle.truncate(sparse_mb * 2**20)
    cases.append(Case("huge_sparse.png", "not a recognised image", "max_file_mb", "special"))
    (folder / "notes.txt").write_bytes(b"operator notes")
    cases.append(Case("notes.txt", "not a recognised image", "unsupported extension", "special",
                      watch="unsupported file extension"))
    valid = valid_unusual()
    for name, data in valid.items():
        (folder / name).write_bytes(data)
    return cases, sorted(valid)


def drop_file_permission_override() -> None:
    """preexec_fn: a root child loses CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so mode 000 really is unreadable
    (what an unprivileged service user meets). A no-op for non-root users, who cannot bypass it anyway."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


# --------------------------------------------------------------------- issue 24: cost before the budget
def png_with_text(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A small valid PNG carrying the given (chunk type, data) text chunks before its image data."""
    png = _encode(Image.new("RGB", (8, 8), (200, 10, 10)), "PNG")
    ihdr_end = 8 + 25
    return png[:ihdr_end] + b"".join(_png_chunk(kind, data) for kind, data in chunks) + png[ihdr_end:]


def tiff_with_strips(strips: int) -> bytes:
    """A 1-pixel-wide TIFF with one strip per row: the offsets and counts arrays alone are 8 bytes a strip."""
    data_at = 8
    offsets_at = data_at + strips
    counts_at = offsets_at + 4 * strips
    ifd_at = counts_at + 4 * strips
    entries = [(256, 4, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, strips, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, counts_at)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    offsets = struct.pack(f"<{strips}I", *range(data_at, data_at + strips))
    return (b"II*\x00" + struct.pack("<I", ifd_at) + b"\x80" * strips + offsets
            + struct.pack(f"<{strips}I", *([1] * strips)) + ifd)


def jpeg_with_scans(repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: every copy is decoded again (minutes for thousands)."""
    jpg = _encode(noisy(64), "JPEG", progressive=True, quality=90)
    last_sos = jpg.rindex(b"\xff\xda")
    return jpg[:last_sos] + jpg[last_sos:-2] * repeats + b"\xff\xd9"


def slow_progressive_jpeg(side: int, scans: int = 60) -> bytes:
    """A flat progressive JPEG whose first luma AC refinement scan is repeated up to `scans` scans: each copy
    is a few bytes that make libjpeg visit every block again (6000 px: 215 kB, 1.5 s of CPU)."""
    jpg = _encode(Image.new("RGB", (side, side), (120, 120, 120)), "JPEG", progressive=True, quality=90)
    starts = [i for i in range(len(jpg) - 1) if jpg[i] == 0xFF and jpg[i + 1] == 0xDA]
    refine = jpg[starts[5]:starts[6]]  # libjpeg's simple progression: scan 5 refines Y AC 1-63
    return jpg[:-2] + refine * (scans - len(starts)) + b"\xff\xd9"


def hostile_bytes() -> dict[str, tuple[bytes, str]]:
    """name -> (content, reason word): files whose header parsing alone costs seconds or a GB (issue 24.1)."""
    inflating = zlib.compress(b"A" * (8 * 2**20), 9)  # 8 KB on the wire, 8 MB once inflated
    many_text = [(b"tEXt", b"k%d\x00" % i + b"v" * 200_000) for i in range(8)]
    return {
        "ztxt_inflates.png": (png_with_text([(b"zTXt", b"Comment\x00\x00" + inflating)]), "metadata"),
        "itxt_inflates.png": (png_with_text([(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + inflating)]),
                              "metadata"),
        "text_chunks_total.png": (png_with_text(many_text), "metadata"),
        "huge_text_chunk.png": (png_with_text([(b"tEXt", b"k\x00" + b"v" * (2 * 2**20))]), "metadata"),
        "strips_100k.tif": (tiff_with_strips(100_000), "strips"),
        "scans_500.jpg": (jpeg_with_scans(500), "scans"),
        "scan_budget.jpg": (slow_progressive_jpeg(6000), "scans x pixels"),
    }
