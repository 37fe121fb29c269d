"""The standing bad-input corpus (issue 14): malformed and hostile files, generated, shared by every channel.

`write_corpus(folder)` writes every case and returns them; each case says which word the per-file error
must contain on the line (`classify`, `watch`, HTTP) and at ingest (`stablesdg data ingest`). The same folder
also gets valid files in unusual encodings, which every channel must still classify / keep.

Used by deploy/tests/test_bad_input_corpus.py (classify, watch, HTTP) and tests/test_ingest_corpus.py
(ingest); `corpus_summary` counts one channel's results (crashes, valid files lost, duplicate rows, each
refusal with its reason) and `assert_clean` holds it to zero.
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
    kind: str = "file"  # file: bytes on disk (all channels); special: FIFO/link/permission, name: an odd file
    # name (both: no HTTP upload, the HTTP channel has no file names of its own)
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
        **hostile_corpus(),
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
        # issue 24: within every structure limit, however unusual
        "ok_3000_idat.png": _many_idat(3000),
        "ok_apng.png": _frames("PNG", 3),
        "ok_animated.webp": _frames("WEBP", 3, lossless=True),
        "ok_exif_icc.jpg": _encode(img, "JPEG", quality=90, icc_profile=b"\x00" * 200_000,
                                   exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"),
        "ok_45_scans.jpg": deepest_progression_jpeg(256),  # the most scans a valid progression has
        "ok_png_named.jpg": _encode(noisy(40), "PNG"),
    }


def write_corpus(folder: Path, sparse_mb: int = 70) -> tuple[list[Case], list[str]]:
    """Every case into `folder` (flat); returns (cases, names of the valid files written alongside)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (data, line, ingest) in malformed_bytes().items():
        (folder / name).write_bytes(data)
        cases.append(Case(name, line, ingest))
    for name, (data, line, ingest) in odd_names().items():
        (folder / name).write_bytes(data)
        cases.append(Case(name, line, ingest, "name"))
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


def _with_point_transform(scan: bytes, ah: int, al: int) -> bytes:
    """A scan (SOS header first) with its successive-approximation byte set to Ah, Al."""
    at = 5 + 2 * scan[4] + 2
    return scan[:at] + bytes([ah << 4 | al]) + scan[at + 1:]


def deepest_progression_jpeg(side: int, depth: int = 13) -> bytes:
    """A valid progressive JPEG with as many scans as T.81 allows a frame: every AC band sent first at
    Al = `depth` (13 at most), then refined one bit a scan (45 scans). Built from libjpeg's 10-scan script of
    a flat frame, whose AC scans are EOB runs, so the same bytes decode at any point transform."""
    jpg = _encode(Image.new("RGB", (side, side), (120, 120, 120)), "JPEG", progressive=True, quality=90)
    starts = [i for i in range(len(jpg) - 1) if jpg[i] == 0xFF and jpg[i + 1] == 0xDA] + [len(jpg) - 2]
    # each scan, then the tables of the next one
    scan = [jpg[a:b] for a, b in zip(starts, starts[1:], strict=False)]

    def refinements(k: int, down_to: int) -> list[bytes]:  # scan k without its trailing tables, refined
        tables = scan[k].find(b"\xff\xc4", 4)
        body = scan[k][:tables] if tables > 0 else scan[k]
        return [_with_point_transform(body, ah, ah - 1) for ah in range(depth, down_to, -1)]

    first = [scan[0], *(_with_point_transform(scan[k], 0, depth) for k in (1, 2, 3, 4))]
    # libjpeg's script: 5 refines Y 1-63 (Ah 2), 6 the DC, 7 / 8 / 9 refine Cr / Cb / Y to Al 0
    return (jpg[:starts[0]] + b"".join([*first, *refinements(5, 2), scan[5], scan[6], *refinements(7, 1),
                                        scan[7], *refinements(8, 1), scan[8], scan[9]]) + b"\xff\xd9")


def costly_valid_jpeg(side: int = 6324) -> bytes:
    """A valid progressive JPEG at the 40 MP pixel limit, textured so that every scan carries data: the
    costliest image the limits let through (about 0.4 s of CPU to decode here)."""
    coarse = np.random.default_rng(side).integers(0, 256, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8)
    texture = Image.fromarray(coarse, "RGB").resize((side, side), Image.Resampling.BICUBIC)
    return _encode(texture, "JPEG", progressive=True, quality=90)


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


# --------------------------------------------------------------------- issue 24: the hostile-header corpus
def _png_file(chunks: list[tuple[bytes, bytes]], size: tuple[int, int] = (8, 8),
              ihdr: bytes | None = None) -> bytes:
    """A PNG made of the given chunks between IHDR and IEND (IDAT of a flat image unless given)."""
    width, height = size
    header = ihdr if ihdr is not None else struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if not any(kind == b"IDAT" for kind, _ in chunks):
        chunks = [*chunks, (b"IDAT", zlib.compress((b"\x00" + b"\x80" * (3 * width)) * height))]
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + b"".join(_png_chunk(kind, data) for kind, data in chunks) + _png_chunk(b"IEND", b""))


def _jpeg_segments(segments: list[tuple[int, bytes]], **save) -> bytes:
    """A small JPEG with extra marker segments (marker, payload) right after SOI."""
    jpg = _encode(noisy(32), "JPEG", quality=85, **save)
    extra = b"".join(bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data
                     for marker, data in segments)
    return jpg[:2] + extra + jpg[2:]


def _jpeg_sof(width: int, height: int) -> bytes:
    """A baseline JPEG whose frame header is rewritten to claim width x height."""
    jpg = bytearray(_encode(noisy(32), "JPEG", quality=85))
    sof = jpg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, height, width)
    return bytes(jpg)


def _tiff_entries(entries: list[tuple[int, int, int, int]], order: str = "<",
                  pixels: bytes = b"\x80" * 64) -> bytes:
    """A classic TIFF with one IFD of (tag, type, count, value) entries after 8 + len(pixels) bytes."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    ifd_at = 8 + len(pixels)
    ifd = struct.pack(order + "H", len(entries)) + b"".join(struct.pack(order + "HHII", *e) for e in entries)
    return magic + struct.pack(order + "I", ifd_at) + pixels + ifd + b"\0" * 4


def _tiff_basic(compression: int = 1, **overrides: int) -> bytes:
    tags = {256: 8, 257: 8, 258: 8, 259: compression, 262: 1, 273: 8, 277: 1, 278: 8, 279: 64}
    tags.update({int(k[1:]): v for k, v in overrides.items()})
    return _tiff_entries([(tag, 3 if tag in (258, 259, 262, 277) else 4, 1, value)
                          for tag, value in sorted(tags.items())])


def _tiled_tiff(tiles: int, order: str = "<") -> bytes:
    """A TIFF whose TileOffsets / TileByteCounts list `tiles` tiles (16 x 16 each)."""
    side = 16 * int(tiles ** 0.5 + 1)
    offsets_at = 8 + 16
    counts_at = offsets_at + 4 * tiles
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 4, 1, 16), (323, 4, 1, 16), (324, 4, tiles, offsets_at),
               (325, 4, tiles, counts_at)]
    arrays = struct.pack(f"{order}{tiles}I", *([8] * tiles))
    arrays += struct.pack(f"{order}{tiles}I", *([16] * tiles))
    return _tiff_entries(entries, order, pixels=b"\x80" * 16 + arrays)


def _bmp(width: int = 8, height: int = 8, bits: int = 24, header_size: int = 40, offset: int = 54,
         colors: int = 0, compression: int = 0, data: bytes | None = None) -> bytes:
    info = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, bits, compression, 0, 2835, 2835,
                       colors, 0)
    pixels = data if data is not None else b"\x80" * (abs(width) * 3 + 3) * abs(height)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, offset) + info + pixels


def _webp_chunks(extra: list[tuple[bytes, bytes]]) -> bytes:
    """A lossless WebP (VP8X form) with extra RIFF chunks after its image data."""
    webp = _encode(noisy(16), "WEBP", lossless=True)
    body = webp[12:] + b"".join(kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)
                                for kind, data in extra)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _frames(fmt: str, count: int, **save) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i % 256, 0, 0)) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **save)
    return buffer.getvalue()


NOT_RECOGNISED = ("not a recognised image", "not an image")
CANNOT_DECODE = ("cannot decode image data", "unreadable or truncated")
CANNOT_OPEN = ("cannot open image", "unreadable or truncated")
METADATA = ("metadata too large", "metadata too large")


def _many_idat(chunks: int) -> bytes:
    """A valid 8 x 8 PNG whose image data is split into `chunks` IDAT chunks (empty ones after the data)."""
    raw = zlib.compress((b"\x00" + b"\x80" * 24) * 8)
    parts = [raw[i:i + 1] for i in range(len(raw))]
    return _png_file([(b"IDAT", part) for part in parts + [b""] * (chunks - len(parts))])


def _webp_claiming(width: int, height: int) -> bytes:
    vp8l = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)) + b"\0" * 16
    return b"RIFF" + struct.pack("<I", 12 + len(vp8l)) + b"WEBPVP8L" + struct.pack("<I", len(vp8l)) + vp8l


def _bad_huffman_jpeg() -> bytes:
    jpg = _encode(noisy(32), "JPEG", quality=85)
    table = jpg.index(b"\xff\xc4")
    return jpg[:table + 5] + b"\xff" * 16 + jpg[table + 21:]


def hostile_corpus() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, line reason, ingest reason): hostile headers of every allowed format (issue 24),
    each refused before or while parsing, at no more cost than a small image."""
    inflating = zlib.compress(b"A" * (8 * 2**20), 9)  # 8 KB on the wire, 8 MB once inflated
    inflating_200k = zlib.compress(b"B" * 200_000)
    stored_2mb = zlib.compress(b"C" * (2 * 2**20), 0)
    png = _encode(noisy(), "PNG")
    jpg = _encode(noisy(32), "JPEG", quality=85)
    progressive = _encode(noisy(), "JPEG", progressive=True, quality=90)
    ihdr = lambda depth, colour, interlace: struct.pack(">IIBBBBB", 8, 8, depth, colour, 0, 0, interlace)  # noqa: E731
    cases = {name: (data, reason, reason) for name, (data, reason) in hostile_bytes().items()}
    cases.update({
        # PNG: text, ICC, EXIF and private chunks, chunk counts, broken headers
        "ztxt_many_inflating.png": (png_with_text([(b"zTXt", b"k%d\x00\x00" % i + inflating_200k)
                                                   for i in range(8)]), *METADATA),
        "iccp_inflates.png": (_png_file([(b"iCCP", b"icc\x00\x00" + inflating)]), *METADATA),
        "iccp_huge.png": (_png_file([(b"iCCP", b"icc\x00\x00" + stored_2mb)]), *METADATA),
        "exif_huge.png": (_png_file([(b"eXIf", b"MM\x00*" + b"\x00" * (2 * 2**20))]), *METADATA),
        "private_chunk_huge.png": (_png_file([(b"prVt", b"\x00" * (2 * 2**20))]), *METADATA),
        "text_chunks_70k.png": (_png_file([(b"tEXt", b"k\x00v")] * 70_000), "chunks", "chunks"),
        "idat_70k.png": (_many_idat(70_000), "chunks", "chunks"),
        "chunk_length_huge.png": (png[:33] + struct.pack(">I", 0x7FFFFFF0) + b"IDAT" + b"\x00" * 64,
                                  *CANNOT_DECODE),
        "bad_bit_depth.png": (_png_file([], ihdr=ihdr(7, 2, 0)), *NOT_RECOGNISED),
        "bad_colour_type.png": (_png_file([], ihdr=ihdr(8, 5, 0)), *NOT_RECOGNISED),
        "bad_interlace.png": (_png_file([], ihdr=ihdr(8, 2, 9)), *CANNOT_DECODE),
        "ihdr_bad_crc.png": (png[:29] + b"\x00\x00\x00\x00" + png[33:], *NOT_RECOGNISED),
        "no_idat.png": (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr(8, 2, 0)) + _png_chunk(b"IEND", b""),
                        *CANNOT_DECODE),
        "idat_not_zlib.png": (_png_file([(b"IDAT", b"\x00" * 64)]), *CANNOT_DECODE),
        "idat_short.png": (_png_file([(b"IDAT", zlib.compress(b"\x00\x80\x80"))], size=(64, 64)),
                           *CANNOT_DECODE),
        # JPEG: scans, EXIF / ICC / comment bombs, frame headers, segments
        "scans_65.jpg": (jpeg_with_scans(56), "scans", "scans"),
        "scans_repeated.jpg": (jpeg_with_scans(50), "progression order", "progression order"),
        "refinement_repeated.jpg": (slow_progressive_jpeg(2580), "progression order", "progression order"),
        "app1_exif_many.jpg": (_jpeg_segments([(0xE1, b"Exif\x00\x00" + b"\x00" * 60_000)] * 40), *METADATA),
        "icc_huge.jpg": (_encode(noisy(32), "JPEG", icc_profile=b"\x00" * (4 * 2**20)), *METADATA),
        "comment_huge.jpg": (_jpeg_segments([(0xFE, b"c" * 65_000)] * 20), *METADATA),
        "sof_65535.jpg": (_jpeg_sof(65535, 65535), "scans x pixels", "scans x pixels"),
        "sof_zero_height.jpg": (_jpeg_sof(32, 0), *NOT_RECOGNISED),
        "no_scan.jpg": (jpg[:jpg.index(b"\xff\xda")] + b"\xff\xd9", *CANNOT_DECODE),
        "truncated_app0.jpg": (b"\xff\xd8\xff\xe0\x00\x10JFIF", *CANNOT_OPEN),
        "segment_length_huge.jpg": (b"\xff\xd8\xff\xe1\xff\xff" + b"\x00" * 100, *CANNOT_OPEN),
        "truncated_progressive.jpg": (progressive[:len(progressive) // 2], *CANNOT_DECODE),
        "bad_huffman.jpg": (_bad_huffman_jpeg(), *CANNOT_DECODE),
        # TIFF: strips and tiles, IFDs, compression, sample depth
        "tiles_100k.tif": (_tiled_tiff(100_000), "strips or tiles", "strips or tiles"),
        "tiles_100k_big_endian.tif": (_tiled_tiff(100_000, ">"), "strips or tiles", "strips or tiles"),
        "strips_65537.tif": (tiff_with_strips(65_537), "strips or tiles", "strips or tiles"),
        "ifd_offset_beyond.tif": (b"II*\x00" + struct.pack("<I", 10_000_000) + b"\x00" * 64, *NOT_RECOGNISED),
        "unknown_compression.tif": (_tiff_basic(compression=99), *NOT_RECOGNISED),
        "ifd_truncated.tif": (_tiff_basic()[:80], *NOT_RECOGNISED),
        "bits_per_sample_99.tif": (_tiff_basic(t258=99), *NOT_RECOGNISED),
        # GIF (not an allowed format, whatever the name) and WebP
        "gif_300_frames.png": (_frames("GIF", 300), *NOT_RECOGNISED),
        "gif_animated.jpg": (_frames("GIF", 2), *NOT_RECOGNISED),
        "webp_exif_huge.webp": (_webp_chunks([(b"EXIF", b"\x00" * (2 * 2**20))]), *METADATA),
        "webp_xmp_huge.webp": (_webp_chunks([(b"XMP ", b"<x/>" * 300_000)]), *METADATA),
        "webp_cut_riff.webp": (_encode(noisy(), "WEBP", quality=80)[:60], *CANNOT_OPEN),
        "webp_bad_vp8.webp": (b"RIFF" + struct.pack("<I", 76) + b"WEBPVP8 " + struct.pack("<I", 64)
                              + b"\x00" * 64, *CANNOT_OPEN),
        "webp_16383_squared.webp": (_webp_claiming(16383, 16383), "bomb", "bomb"),
        # BMP: odd headers
        "bmp_zero_bits.bmp": (_bmp(bits=0), *CANNOT_OPEN),
        "bmp_bits_7.bmp": (_bmp(bits=7), *CANNOT_OPEN),
        "bmp_header_size_huge.bmp": (_bmp(header_size=0x7FFFFFFF), *CANNOT_OPEN),
        "bmp_palette_huge.bmp": (_bmp(bits=8, colors=0x7FFFFFFF), *CANNOT_OPEN),
        "bmp_offset_beyond.bmp": (_bmp(offset=10_000_000), *CANNOT_DECODE),
        "bmp_rle_truncated.bmp": (_bmp(bits=8, compression=1, data=b"\x05"), "not enough image data",
                                  "not enough image data"),
        "bmp_bad_compression.bmp": (_bmp(compression=42), *CANNOT_OPEN),
        "bmp_header_only.bmp": (_bmp()[:20], *CANNOT_OPEN),
        "bmp_negative_size.bmp": (_bmp(width=-8, height=-8), "bomb", "bomb"),
        # wrong extensions: the content decides, and so does its fault
        "truncated_png_named.tif": (png[:3500], *CANNOT_DECODE),
        "truncated_jpeg_named.png": (_encode(noisy(), "JPEG")[:1000], *CANNOT_DECODE),
    })
    return cases


def odd_names() -> dict[str, tuple[bytes, str, str]]:
    """Refused files whose names have odd bytes: the row and the reason must survive the name."""
    text = b"not an image, name test "
    return {
        os.fsdecode(b"camera\xff\xfe_bad.png"): (text + b"1", *NOT_RECOGNISED),
        "line\nbreak.jpg": (text + b"2", *NOT_RECOGNISED),
        "-rf --help.png": (text + b"3", *NOT_RECOGNISED),
        "spaces and \u00fcn\u00efc\u00f6d\u00e9.bmp": (text + b"4", *NOT_RECOGNISED),
        "$(reboot);`id`.tif": (text + b"5", *NOT_RECOGNISED),
        "tab\tand\x1b[31mescape.webp": (text + b"6", *NOT_RECOGNISED),
    }


def corpus_summary(cases: list[Case], valid: list[str], outcomes: dict[str, list[str | None]], crashes: int,
                   expected) -> dict:
    """One channel's count of the corpus. `outcomes`: each name -> the error of every row or answer it got
    (None: classified); `expected(case)`: the word its error must contain, or None where the channel leaves
    the file alone (watch and FIFOs). A refusal counts only with its reason."""
    refusals: dict[str, str] = {}
    wrong_reason: dict[str, str | None] = {}
    missing = []
    for case in cases:
        want, got = expected(case), outcomes.get(case.name, [])
        if want is None:
            continue
        if not got:
            missing.append(case.name)
        elif got[0] is not None and want in got[0]:
            refusals[case.name] = got[0]
        else:
            wrong_reason[case.name] = got[0]
    return {"cases": len(cases), "refused": len(refusals), "crashes": crashes, "valid_files": len(valid),
            "valid_lost": sorted(n for n in valid if None not in outcomes.get(n, [])),
            "duplicates": sorted(n for n, got in outcomes.items() if len(got) > 1),
            "wrong_reason": wrong_reason, "missing": sorted(missing), "refusals": refusals}


def assert_clean(summary: dict, refused: int) -> None:
    """crashes 0, valid files lost 0, duplicates 0, and `refused` refusals, each with its reason."""
    brief = {k: v for k, v in summary.items() if k != "refusals"}
    assert summary["crashes"] == 0 and summary["valid_lost"] == [] and summary["duplicates"] == [], brief
    assert summary["wrong_reason"] == {} and summary["missing"] == [], brief
    assert summary["refused"] == refused and all(summary["refusals"].values()), brief
