"""Safe image decoding and the exact preprocessing of the model contract."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .contract import PreprocessSpec

# Steel-line cameras deliver a few megapixels; 40 MP leaves room while a header-only "bomb" claiming
# gigapixels is refused before any pixel buffer is allocated.
DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = str | Path | bytes | BinaryIO


class ImageRejected(ValueError):
    """A file that cannot be classified (not an image, truncated, empty, too large...)."""


def _open_stream(source: ImageSource) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageRejected(f"not a regular file: {path}")
        try:
            return path.open("rb")
        except OSError as err:
            raise ImageRejected(f"cannot read file: {err}") from err
    return source


def _reject_if_empty(stream: BinaryIO) -> None:
    """Say "empty" rather than "unknown format" for 0-byte files and uploads: a different fault upstream."""
    start = stream.tell()
    if not stream.read(1):
        raise ImageRejected("empty file (0 bytes)")
    stream.seek(start)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully into memory; every decoder failure becomes ImageRejected with a readable reason."""
    stream = _open_stream(source)
    try:
        _reject_if_empty(stream)
        return _decode(stream, max_pixels)
    finally:
        if stream is not source:
            stream.close()


def _decode(stream: BinaryIO, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(stream)
    except UnidentifiedImageError as err:
        raise ImageRejected("not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"decompression bomb refused: {err}") from err
    except Exception as err:  # any decoder bug on hostile input must stay a per-file error
        raise ImageRejected(f"cannot open image: {type(err).__name__}: {err}") from err
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has empty dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(f"image is {width}x{height} = {width * height} pixels, "
                            f"above the limit of {max_pixels}")
    try:
        img.load()  # forces full decoding here, so truncated data fails now and not mid-batch
    except Exception as err:
        raise ImageRejected(f"cannot decode image data ({img.format}): {type(err).__name__}: {err}") from err
    return img


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One image -> float32 [C, H, W], exactly as the contract prescribes."""
    resized = img.convert(spec.channel_mode).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
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
