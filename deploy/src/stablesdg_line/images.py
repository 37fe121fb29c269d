"""Safe image decoding and the exact preprocessing of the model contract.

The mode step (`to_channel_mode`) is the one preprocessing contract shared with training: StableSDG's ingest
(`stablesdg.decoding.to_8bit`) normalises 16-bit, 32-bit and float images the same way, and a test in the main
suite checks that both paths give the same array for 8-bit, 16-bit, RGBA, palette and CMYK inputs.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .contract import PreprocessSpec

# Steel-line cameras deliver a few megapixels; 40 MP leaves room while a header-only "bomb" claiming
# gigapixels is refused before any pixel buffer is allocated.
DEFAULT_MAX_PIXELS = 40_000_000
# Decoded by content, never by name: anything else (EPS would start Ghostscript, PSD, ICO...) is refused
# before a decoder for it runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Reasons that can mean "the writer has not finished yet": watch mode retries these for a grace period.
INCOMPLETE_REASONS = ("empty file", "cannot decode image data")

ImageSource = str | Path | bytes | BinaryIO

# The cost of an image is bounded before Pillow parses it, not only its pixels (issue 24): metadata that
# inflates to megabytes, a TIFF with a million strips or a JPEG with thousands of scans each cost seconds of
# CPU or a GB of memory at open/decode while claiming a small size. A camera frame has a few text chunks,
# at most a few thousand strips or tiles, and a progressive JPEG about ten scans.
MAX_TEXT_CHUNK_BYTES = 256 * 1024
MAX_TEXT_TOTAL_BYTES = 1024 * 1024
MAX_TIFF_STRIPS = 65_536
MAX_JPEG_SCANS = 64
# Metadata a decoder reads and keeps (JPEG APPn/COM segments: EXIF, ICC, XMP; PNG ancillary chunks; WebP
# EXIF/ICCP/XMP chunks): a camera writes tens of kB, an ICC profile is at most a few hundred.
MAX_METADATA_BYTES = 1024 * 1024
# Pillow handles every PNG chunk in Python: a 20 MB upload of 1-byte IDAT chunks is 1.6 M turns of that loop.
MAX_PNG_CHUNKS = 65_536
PNG_CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
WEBP_IMAGE_CHUNKS = (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF")
# Each progressive scan revisits every block of the image: a refinement scan of a few bytes over 36 MP costs
# ~30 ms, so 60 of them 1.5 s from a 215 kB file. Scans x pixels is bounded too: the 10 scans of libjpeg's
# progressive script over a 40 MP frame (a textured one decodes in 0.4 s here). Within that budget, scans that
# repeat a refinement are refused by the progression check (_jpeg_progression_fault).
MAX_JPEG_SCAN_PIXELS = 400_000_000
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
JPEG_PROGRESSIVE_SOF_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
NOT_SENT = 0xFF  # a coefficient no scan has sent yet (an Al is 0-13)
PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK_BYTES  # Pillow's own limits (defaults 1 MB / 64 MB)
PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_TOTAL_BYTES
TIFF_STRIP_TAGS = (273, 324)  # StripOffsets, TileOffsets


class ImageRejected(ValueError):
    """A file that cannot be classified (not an image, truncated, empty, too large...)."""


class DecodeTimeout(ImageRejected):
    """Decoding went past its deadline (a slow file, e.g. a progressive JPEG whose scans each cost a lot)."""


# A structure within the limits can still be slow (a 20 MB progressive JPEG of 60 large scans: ~2 s of
# CPU); the deadline bounds what any one file or request can take. A 40 MP camera frame decodes in < 1 s.
DEFAULT_DECODE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Deadline:
    """Decoding must end by `at` (time.monotonic()); checked between the decoder's reads, so a deadline is
    overshot by at most one read: 64 kB of data or, for a JPEG, one scan."""

    at: float
    seconds: float
    scope: str = ""  # what the budget covers, for the message ("", "for the whole request")

    @classmethod
    def after(cls, seconds: float | None, scope: str = "") -> Deadline | None:
        return None if seconds is None or seconds <= 0 else cls(time.monotonic() + seconds, seconds, scope)

    def check(self) -> None:
        if time.monotonic() > self.at:
            scope = f" {self.scope}" if self.scope else ""
            raise DecodeTimeout(f"decode took longer than {self.seconds:g} s (--decode-timeout{scope}): "
                                "refused")


class _PacedReader(io.BytesIO):
    """The file's bytes as Pillow reads them: the deadline is checked at every read, and a JPEG is handed
    over one scan at a time, so that libjpeg returns to Python between scans."""

    def __init__(self, data: bytes, deadline: Deadline, jpeg: bool):
        super().__init__(data)
        self._data, self._deadline, self._jpeg = data, deadline, jpeg

    def read(self, size: int | None = -1) -> bytes:
        self._deadline.check()
        if self._jpeg:
            start = self.tell()
            next_scan = self._data.find(b"\xff\xda", start + 1)
            if next_scan > start and (size is None or size < 0 or start + size > next_scan):
                size = next_scan - start
        return super().read(size)


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open_stream(source: ImageSource) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, (str, Path)):
        return open_regular_file(Path(source))
    return source


def open_regular_file(path: Path) -> BinaryIO:
    """Open for reading only if it is a regular file: a FIFO, a device or a link to one is never opened.

    The check is repeated on the open descriptor (O_NONBLOCK, so a FIFO swapped in meanwhile cannot hang).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        kind = "broken symbolic link" if os.path.islink(path) else "missing"
        raise ImageRejected(f"not a regular file ({kind}): {path}") from err
    except OSError as err:
        raise ImageRejected(f"cannot read file: {err.strerror or err}: {path}") from err
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected(f"not a regular file ({file_kind(info.st_mode)}): {path}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ImageRejected(f"cannot read file: {err.strerror or err}: {path}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageRejected(f"not a regular file (changed while opening): {path}")
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def _reject_if_empty(stream: BinaryIO) -> None:
    """Say "empty" rather than "unknown format" for 0-byte files and uploads: a different fault upstream."""
    start = stream.tell()
    if not stream.read(1):
        raise ImageRejected("empty file (0 bytes)")
    stream.seek(start)


def _jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers: entropy-coded data stuffs each 0xFF with 0x00, so FF DA is always a marker."""
    return data.count(b"\xff\xda")


@dataclass(frozen=True)
class JpegHeader:
    """What the marker segments before the first scan say: the ones Pillow parses and keeps."""

    width: int  # 0 without a frame header: Pillow gives the reason
    height: int
    metadata: int  # bytes of the APP0-APP15 and COM segments
    progressive: bool
    first_scan: int  # offset of the first SOS marker (-1: none)


def _jpeg_header(data: bytes) -> JpegHeader:
    pos, width, height, metadata, progressive = 2, 0, 0, 0, False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return JpegHeader(width, height, metadata, progressive, pos)
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in JPEG_SOF_MARKERS and pos + 9 <= len(data) and not width:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            progressive = marker in JPEG_PROGRESSIVE_SOF_MARKERS
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length
        pos += 2 + length
    return JpegHeader(width, height, metadata, progressive, -1)


def _jpeg_progression_fault(data: bytes, first_scan: int) -> str | None:
    """Why a progressive JPEG's scans break ITU-T T.81's successive approximation (G.1.1.1.2), or None.

    A coefficient is first sent with Ah = 0; each later scan of it refines it by one bit (its Ah is the
    previous scan's Al, and Al = Ah - 1). So no coefficient has more than 14 scans, and a frame's decoding
    cost is bounded by its pixels. libjpeg only warns on a scan that breaks this and decodes it again: a flat
    2580 x 2580 frame with one refinement scan repeated 50 times is 41 kB and costs 0.6 s of CPU
    (issue 24)."""
    last_al: dict[int, bytearray] = {}  # component id -> per coefficient, the Al it was last sent at
    pos, scan = first_scan, 1
    while pos >= 0 and pos + 5 <= len(data):
        components = data[pos + 4]
        ends = pos + 5 + 2 * components
        if ends + 3 > len(data):
            return None  # cut short: Pillow gives the reason
        ss, se, ah, al = data[ends], data[ends + 1], data[ends + 2] >> 4, data[ends + 2] & 0x0F
        if ss <= se < 64:
            expected = NOT_SENT if ah == 0 else ah
            for component in data[pos + 5:ends:2]:
                band = last_al.setdefault(component, bytearray([NOT_SENT]) * 64)
                if band[ss:se + 1].count(expected) != se - ss + 1 or (ah and al != ah - 1):
                    return _progression_fault(scan, component, ss, se, ah, al, band[ss:se + 1])
                band[ss:se + 1] = bytes([al]) * (se - ss + 1)
        scan += 1
        pos = data.find(b"\xff\xda", ends)
    return None


def _png_chunks(data: bytes) -> tuple[int, int]:
    """(chunks, ancillary chunk bytes) of a PNG, walking chunk headers only; stops at a cut-short chunk."""
    pos, chunks, metadata = 8, 0, 0
    while pos + 8 <= len(data) and chunks <= MAX_PNG_CHUNKS:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind not in PNG_CRITICAL_CHUNKS:
            metadata += length
        if kind == b"IEND":
            break
        pos += 12 + length
    return chunks, metadata


def _webp_metadata(data: bytes) -> int:
    """Bytes of a WebP's RIFF chunks that are not image data (EXIF, ICCP, XMP, unknown)."""
    pos, metadata = 12, 0
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, pos)
        if kind not in WEBP_IMAGE_CHUNKS:
            metadata += length
        pos += 8 + length + (length & 1)
    return metadata


def _too_much_metadata(kind: str, size: int) -> ImageRejected:
    return ImageRejected(f"metadata too large: {kind} carries {size} bytes of metadata, above the limit of "
                         f"{MAX_METADATA_BYTES}: refused before parsing")


def _tiff_strips(data: bytes) -> int:
    """Strip or tile count of the first IFD of a classic TIFF, from its 12-byte entries (no Pillow parse)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (entries,) = struct.unpack_from(order + "H", data, offset)
        for i in range(min(entries, 4096)):
            tag, _type, count = struct.unpack_from(order + "HHI", data, offset + 2 + 12 * i)
            if tag in TIFF_STRIP_TAGS:
                return count
    except struct.error:
        return 0  # cut short: Pillow gives the reason
    return 0


def _progression_fault(scan: int, component: int, ss: int, se: int, ah: int, al: int, sent: bytearray) -> str:
    before = sorted(set(sent) - {NOT_SENT})
    earlier = (f"earlier scans sent them at Al={'/'.join(map(str, before))}" if before
               else "no earlier scan sent them")
    return (f"JPEG scan {scan} is out of progression order: it sends coefficients {ss}-{se} of component "
            f"{component} at Ah={ah} Al={al}, and {earlier}; a progressive JPEG sends a coefficient first at "
            "Ah=0, then refines it one bit a scan (ITU-T T.81 G.1.1.1.2). libjpeg would decode such a repeat "
            "again: refused before decoding")


def check_structure(stream: BinaryIO) -> bytes:
    """Refuse, before any parser runs, a file whose structure alone would cost more than an image can need;
    returns the file's bytes (the stream is left where it was)."""
    start = stream.tell()
    data = stream.read()
    stream.seek(start)
    if data[:2] == b"\xff\xd8":
        scans = _jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise ImageRejected(f"JPEG has {scans} scans, above the limit of {MAX_JPEG_SCANS} (a progressive "
                                "camera frame has about 10): refused before decoding")
        header = _jpeg_header(data)
        width, height, metadata = header.width, header.height, header.metadata
        if scans * width * height > MAX_JPEG_SCAN_PIXELS:
            raise ImageRejected(f"JPEG has {scans} scans of {width}x{height} pixels, above the limit of "
                                f"{MAX_JPEG_SCAN_PIXELS} scans x pixels (each scan decodes the whole image "
                                "again): refused before decoding")
        if metadata > MAX_METADATA_BYTES:
            raise _too_much_metadata("JPEG", metadata)
        if header.progressive and (fault := _jpeg_progression_fault(data, header.first_scan)):
            raise ImageRejected(fault)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks, metadata = _png_chunks(data)
        if chunks > MAX_PNG_CHUNKS:
            raise ImageRejected(f"PNG has more than {MAX_PNG_CHUNKS} chunks (an encoder writes one per 8 kB "
                                "or more): refused before parsing")
        if metadata > MAX_METADATA_BYTES:
            raise _too_much_metadata("PNG", metadata)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        metadata = _webp_metadata(data)
        if metadata > MAX_METADATA_BYTES:
            raise _too_much_metadata("WebP", metadata)
    if data[:4] in (b"II*\x00", b"MM\x00*") and (strips := _tiff_strips(data)) > MAX_TIFF_STRIPS:
        raise ImageRejected(f"TIFF has {strips} strips or tiles, above the limit of {MAX_TIFF_STRIPS}: "
                            "refused before parsing")
    return data


def _open_allowed(stream: BinaryIO, deadline: Deadline | None = None) -> Image.Image:
    data = check_structure(stream)
    if deadline is not None:
        deadline.check()
        stream = _PacedReader(data, deadline, jpeg=data[:2] == b"\xff\xd8")
    try:
        return Image.open(stream, formats=ALLOWED_FORMATS)
    except ImageRejected:
        raise
    except UnidentifiedImageError as err:
        raise ImageRejected("not a recognised image format (allowed by content: "
                            f"{', '.join(f.lower() for f in ALLOWED_FORMATS)})") from err
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"decompression bomb refused: {err}") from err
    except Exception as err:  # any decoder bug on hostile input must stay a per-file error
        reason = _metadata_reason(err) or f"cannot open image: {type(err).__name__}: {err}"
        raise ImageRejected(reason) from err


def _metadata_reason(err: Exception) -> str | None:
    """Pillow's text-chunk limits raise a plain ValueError: name it as the metadata limit it is."""
    if isinstance(err, ValueError) and "text" in str(err).lower():
        return (f"metadata too large: {err} (limit {MAX_TEXT_CHUNK_BYTES} bytes a chunk, "
                f"{MAX_TEXT_TOTAL_BYTES} in all)")
    return None


def _check_size(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has empty dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(f"image is {width}x{height} = {width * height} pixels, "
                            f"above the limit of {max_pixels}")


def probe(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Format and size from the header only (no pixel data decoded); raises ImageRejected.

    A stream is rewound to where it was, so it can be decoded afterwards.
    """
    stream = _open_stream(source)
    start = stream.tell()
    try:
        _reject_if_empty(stream)
        with _open_allowed(stream) as img:
            _check_size(img, max_pixels)
            return ImageHeader(img.format or "?", *img.size)
    finally:
        if stream is source:
            stream.seek(start)
        else:
            stream.close()


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               deadline: Deadline | None = None) -> Image.Image:
    """Decode fully into memory; every decoder failure becomes ImageRejected with a readable reason, and
    decoding past `deadline` DecodeTimeout."""
    stream = _open_stream(source)
    try:
        _reject_if_empty(stream)
        return _decode(stream, max_pixels, deadline)
    finally:
        if stream is not source:
            stream.close()


def _decode(stream: BinaryIO, max_pixels: int, deadline: Deadline | None) -> Image.Image:
    img = _open_allowed(stream, deadline)
    _check_size(img, max_pixels)
    try:
        img.load()  # forces full decoding here, so truncated data fails now and not mid-batch
    except ImageRejected:
        raise
    except Exception as err:
        reason = (_metadata_reason(err)
                  or f"cannot decode image data ({img.format}): {type(err).__name__}: {err}")
        raise ImageRejected(reason) from err
    return img


HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"})


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float single-channel images -> 8-bit L, stretched by the image's own range.

    PIL's convert('L') would clip everything above 255. Non-finite samples are ignored for the range and
    become 0. Every other mode is returned as is. Must stay identical to `stablesdg.decoding.to_8bit`.
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


def to_channel_mode(img: Image.Image, channel_mode: str) -> Image.Image:
    """The mode step of the contract: high bit depth stretched to 8 bit, then PIL's convert."""
    return to_8bit(img).convert(channel_mode)


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One image -> float32 [C, H, W], exactly as the contract prescribes."""
    converted = to_channel_mode(img, spec.channel_mode)
    resized = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255.0
    x = np.repeat(x[None], spec.input_channels, axis=0) if spec.channel_mode == "L" else x.transpose(2, 0, 1)
    return (x - spec.mean[:, None, None]) / spec.std[:, None, None]


def stack_batch(rows: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def load_images_as_batch(paths: Iterable[ImageSource], spec: PreprocessSpec,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode + preprocess into one [N, C, H, W] batch (raises ImageRejected on the first bad file).

    Meant for benchmarks and scripts that time preprocessing apart from Classifier.run_batch.
    """
    return stack_batch([preprocess(load_image(p, max_pixels), spec) for p in paths])
