"""Valid and malformed image files for watch/serve tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (230, 10, 10), (10, 230, 10), (10, 10, 230)


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (32, 24),
                mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_bytes(fmt: str, size: tuple[int, int] = (96, 96)) -> bytes:
    """Incompressible pixels, so cutting the file in half really cuts image data."""
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width x height but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def write_valid_corpus(folder: Path) -> dict[str, str]:
    """name -> expected class for the RGB test model, in formats and modes a line camera might produce."""
    files = {
        "red.png": (image_bytes(RED), "red_defect"),
        "green.jpg": (image_bytes(GREEN, "JPEG"), "green_defect"),
        "blue.bmp": (image_bytes(BLUE, "BMP"), "blue_defect"),
        "blue_palette.png": (image_bytes(BLUE, mode="P"), "blue_defect"),
        "red_rgba.png": (image_bytes(RED, mode="RGBA"), "red_defect"),
        "green.tiff": (image_bytes(GREEN, "TIFF"), "green_defect"),
        "png_named.jpeg": (image_bytes(RED), "red_defect"),  # content decides, not the extension
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


def write_malformed_corpus(folder: Path) -> dict[str, str]:
    """name -> a word the rejection reason must contain."""
    files = {
        "empty.png": (b"", "empty"),
        "truncated.png": (noisy_bytes("PNG")[:3000], "cannot decode"),
        "truncated.jpg": (noisy_bytes("JPEG")[:1500], "cannot decode"),
        "text_renamed.png": (b"this is a shift report, not an image\n" * 20, "not a recognised image"),
        "random.jpg": (np.random.default_rng(1).bytes(4096), "not a recognised image"),
        "pil_bomb.png": (png_header_only(100_000, 100_000), "bomb"),
        "over_limit.png": (png_header_only(7_000, 7_000), "above the limit"),
        "zero_width.png": (png_header_only(0, 16), "not a recognised image"),
        "notes.txt": (b"operator notes", "unsupported file extension"),
        "no_extension": (image_bytes(RED), "unsupported file extension"),
        "header_only.png": (noisy_bytes("PNG")[:33], "not a recognised image"),  # IHDR, no data
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
