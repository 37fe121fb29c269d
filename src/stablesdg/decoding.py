"""Reading and decoding one source image, as ingest does: the file checked from `stat` before it is opened, its
structure's parse cost bounded before Pillow runs (the line's limits), then a full decode, the 8-bit contract
shared with the line runtime and the resize to data.image_size. Raises ValueError with a reason a person
understands; `data.ingest` quarantines the file with it.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .config import DataConfig

IMAGE_EXTENSIONS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}
# Decoded by content, as on the line (deploy/ stablesdg_line.images.ALLOWED_FORMATS): any other format is
# quarantined before a decoder for it runs (EPS would start Ghostscript).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# A file's cost is bounded before Pillow parses it, with the line's limits (stablesdg_line.images, issue 24):
# PNG text that inflates to megabytes, a TIFF with a million strips and a JPEG with thousands of scans (or
# fewer scans of a huge frame: each one decodes every block again) cost seconds or a GB at open and decode.
# deploy/tests/badinputs.py's hostile files are refused by both, each with its reason.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024  # Pillow's defaults: 1 MB a chunk, 64 MB in all
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
MAX_JPEG_SCANS = 64
MAX_JPEG_SCAN_PIXELS = 400_000_000  # scans x pixels: libjpeg's 10 progressive scans of a 40 MP frame
MAX_TIFF_STRIPS = 65_536
MAX_METADATA_BYTES = 1024 * 1024  # JPEG APPn/COM, PNG ancillary chunks, WebP EXIF/ICCP/XMP
MAX_PNG_CHUNKS = 65_536


# --------------------------------------------------------------------------------------- decoding
HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"})


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float single-channel images -> 8-bit L, stretched by the image's own range.

    PIL's convert('L') would clip everything above 255. Non-finite samples are ignored for the range and
    become 0. This is the preprocessing contract shared with the line runtime (`stablesdg_line.images.to_8bit`,
    which must stay identical; tests/test_preprocess_parity.py compares the two on the same files).
    """
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.fromarray(np.zeros(arr.shape, dtype=np.uint8), mode="L")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


_to_8bit = to_8bit  # old name


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_source_file(path: Path, cfg: DataConfig) -> bytes:
    """The bytes of one source file, checked from `stat` before anything is opened or read.

    Non-regular files (FIFO, device, a symlink to /dev/zero) are never opened; a file over data.max_file_mb is
    never read. Symlinks to regular files are followed (DVC's symlink cache uses them). Raises ValueError.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError("broken symbolic link" if os.path.islink(path) else "file vanished") from None
    except OSError as err:
        raise ValueError(f"cannot read file: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"not a regular file ({_file_kind(info.st_mode)}); not opened")
    _check_file_size(info.st_size, cfg)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ValueError(f"cannot read file: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped between stat and open
            raise ValueError(f"not a regular file ({_file_kind(info.st_mode)}); not read")
        limit = int(cfg.max_file_mb * 1024 * 1024)
        try:
            raw = handle.read(limit + 1)
        except OSError as err:
            raise ValueError(f"cannot read file: {err.strerror or err}") from None
    _check_file_size(len(raw), cfg)  # grew after the stat
    return raw


def _check_file_size(size: int, cfg: DataConfig) -> None:
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    if size > cfg.max_file_mb * 1024 * 1024:
        raise ValueError(f"file is {size / 2**20:.1f} MB, over data.max_file_mb={cfg.max_file_mb}")


def decode_image(path: Path, cfg: DataConfig) -> Image.Image:
    """Open, fully decode and normalise one image; raises ValueError with a reason a person understands."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported extension {path.suffix or '(none)'}; use one of {sorted(IMAGE_EXTENSIONS)}")
    return decode_image_bytes(read_source_file(path, cfg), path.suffix, cfg)[0]


def costly_structure(raw: bytes) -> str | None:
    """Why the file's structure alone would cost more than any image needs, or None; no parser runs."""
    metadata = 0
    if raw.startswith(b"\xff\xd8"):
        scans = raw.count(b"\xff\xda")  # entropy-coded data stuffs 0xFF with 0x00: FF DA is always a marker
        width, height, metadata, progressive, first_scan = _jpeg_frame(raw)
        if scans > MAX_JPEG_SCANS or scans * width * height > MAX_JPEG_SCAN_PIXELS:
            return (f"costly structure: JPEG has {scans} scans of {width}x{height} pixels (limits "
                    f"{MAX_JPEG_SCANS} scans, {MAX_JPEG_SCAN_PIXELS} scans x pixels)")
        if progressive and metadata <= MAX_METADATA_BYTES and (fault := _out_of_order_scan(raw, first_scan)):
            return fault
    elif raw.startswith(b"\x89PNG\r\n\x1a\n"):
        chunks, metadata = _png_layout(raw)
        if chunks > MAX_PNG_CHUNKS:
            return f"costly structure: PNG has more than {MAX_PNG_CHUNKS} chunks"
    elif raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        metadata = _webp_extra_bytes(raw)
    elif raw[:4] in (b"II*\x00", b"MM\x00*"):
        strips = _strip_count(raw)
        if strips > MAX_TIFF_STRIPS:
            return f"costly structure: TIFF has {strips} strips or tiles (limit {MAX_TIFF_STRIPS})"
    if metadata > MAX_METADATA_BYTES:
        return f"metadata too large: {metadata} bytes of metadata (limit {MAX_METADATA_BYTES})"
    return None


def _jpeg_frame(raw: bytes) -> tuple[int, int, int, bool, int]:
    """A JPEG's width and height (SOFn), its APPn + COM bytes, whether the frame is progressive and where its
    first scan starts (-1: none), from the segments before that scan."""
    at, cols, rows, extra, progressive = 2, 0, 0, 0, False
    while at + 4 <= len(raw) and raw[at] == 0xFF and raw[at + 1] != 0xDA:
        kind = raw[at + 1]
        if kind == 0xFF:
            at += 1
            continue
        size = struct.unpack(">H", raw[at + 2:at + 4])[0]
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC) and not cols and at + 9 <= len(raw):
            rows, cols = struct.unpack(">HH", raw[at + 5:at + 9])
            progressive = kind in (0xC2, 0xC6, 0xCA, 0xCE)
        extra += size if kind == 0xFE or 0xE0 <= kind <= 0xEF else 0
        at += 2 + size
    first_scan = at if at + 1 < len(raw) and raw[at:at + 2] == b"\xff\xda" else -1
    return cols, rows, extra, progressive, first_scan


def _out_of_order_scan(raw: bytes, at: int) -> str | None:
    """The first scan that breaks successive approximation (ITU-T T.81 G.1.1.1.2: a coefficient goes first at
    Ah = 0, then one bit a scan, Ah = the last Al and Al = Ah - 1), as a reason; None for a valid progression.
    The line runtime refuses the same files (stablesdg_line.images._jpeg_progression_fault): libjpeg decodes
    a repeated scan again, so a 41 kB file could cost 0.6 s of CPU."""
    precision: dict[int, list[int]] = {}  # component id -> Al each coefficient was last sent at (-1: not yet)
    number = 0
    while at >= 0 and at + 5 <= len(raw):
        number += 1
        n = raw[at + 4]
        tail = at + 5 + 2 * n
        if tail + 3 > len(raw):
            break  # cut short: Pillow gives the reason
        first, last, high, low = raw[tail], raw[tail + 1], raw[tail + 2] >> 4, raw[tail + 2] & 0x0F
        for component in raw[at + 5:tail:2] if first <= last < 64 else b"":
            coefficients = precision.setdefault(component, [-1] * 64)
            wanted = high if high else -1
            if any(c != wanted for c in coefficients[first:last + 1]) or (high and low != high - 1):
                return (f"costly structure: JPEG scan {number} is out of progression order (coefficients "
                        f"{first}-{last} of component {component} at Ah={high} Al={low})")
            coefficients[first:last + 1] = [low] * (last - first + 1)
        at = raw.find(b"\xff\xda", tail)
    return None


def _png_layout(raw: bytes) -> tuple[int, int]:
    """How many chunks a PNG has (counted up to one past the limit) and the bytes of its ancillary ones."""
    at, count, extra = 8, 0, 0
    while at + 8 <= len(raw) and count <= MAX_PNG_CHUNKS:
        size, kind = struct.unpack(">I4s", raw[at:at + 8])
        count += 1
        extra += 0 if kind in (b"IHDR", b"PLTE", b"IDAT", b"IEND") else size
        if kind == b"IEND":
            break
        at += size + 12
    return count, extra


def _webp_extra_bytes(raw: bytes) -> int:
    """Bytes of the RIFF chunks of a WebP that hold no image data (EXIF, ICCP, XMP, unknown)."""
    at, extra = 12, 0
    while at + 8 <= len(raw):
        kind, size = struct.unpack("<4sI", raw[at:at + 8])
        extra += 0 if kind in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF") else size
        at += 8 + size + size % 2
    return extra


def _strip_count(raw: bytes) -> int:
    """StripOffsets / TileOffsets count in a classic TIFF's first IFD (0 when cut short)."""
    endian = "<" if raw.startswith(b"II") else ">"
    try:
        first = struct.unpack_from(endian + "I", raw, 4)[0]
        entries = struct.unpack_from(endian + "H", raw, first)[0]
        for n in range(min(entries, 4096)):
            tag, _, count = struct.unpack_from(endian + "HHI", raw, first + 2 + 12 * n)
            if tag in (273, 324):
                return count
    except struct.error:
        pass
    return 0


def decode_image_bytes(raw: bytes, suffix: str, cfg: DataConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Decode + normalise in-memory file bytes; returns (image at image_size, original (width, height))."""
    _check_file_size(len(raw), cfg)
    if suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported extension {suffix or '(none)'}; use one of {sorted(IMAGE_EXTENSIONS)}")
    problem = costly_structure(raw)
    if problem is not None:
        raise ValueError(f"{problem}: refused before decoding")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ValueError(f"image has zero size {width}x{height}")
                if width * height > cfg.max_pixels:
                    raise ValueError(
                        f"decompression bomb: {width}x{height} exceeds data.max_pixels={cfg.max_pixels}"
                    )
                img.seek(0)  # multi-frame TIFF/GIF: the first frame is the image
                img.load()
                converted = to_8bit(img).convert(cfg.color_mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (cannot identify the format; allowed by content: "
                         f"{', '.join(f.lower() for f in ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, EOFError, struct.error) as err:
        raise ValueError(f"unreadable or truncated image: {err}") from None
    except ValueError as err:
        if "text" in str(err).lower():  # Pillow's PNG text-chunk limits (MAX_TEXT_CHUNK / MAX_TEXT_MEMORY)
            raise ValueError(f"metadata too large: {err}") from None
        raise
    except Exception as err:  # a decoder bug on hostile input stays this file's problem
        raise ValueError(f"cannot decode image: {type(err).__name__}: {err}") from None
    return converted.resize((cfg.image_size, cfg.image_size), Image.BILINEAR), (width, height)
