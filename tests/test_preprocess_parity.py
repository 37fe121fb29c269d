"""Issue 14.4: training ingest and the line runtime share one preprocessing contract, array for array.

Training path: `stablesdg.data` ingest (decode, mode contract, resize to data.image_size, PNG on disk) and then
`stablesdg.preprocess.preprocess_image` on that PNG. Line path: `stablesdg_line` on the raw camera file.
Both must give the same float32 array (not only the same top-1) for 8-bit, 16-bit, RGBA, palette and CMYK
inputs. They do whenever one resize happens on each side: the source is data.image_size already (NEU's
200x200), or data.image_size equals classifier.input_size; both cases are checked.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stablesdg.config import DataConfig
from stablesdg.decoding import decode_image_bytes
from stablesdg.preprocess import PreprocessSpec, preprocess_image

line = pytest.importorskip("stablesdg_line")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _inputs(size: tuple[int, int]) -> dict[str, bytes]:
    w, h = size
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    full_range16 = (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)  # the gradient
    twelve_bit = rng.integers(0, 4096, (h, w)).astype(np.uint16)  # a 12-bit camera in a 16-bit container
    return {
        "8-bit gray": _encode(rgb.convert("L"), "PNG"),
        "8-bit RGB": _encode(rgb, "PNG"),
        "16-bit full range": _encode(Image.fromarray(full_range16), "PNG"),
        "16-bit 12-bit data": _encode(Image.fromarray(twelve_bit), "TIFF"),
        "RGBA": _encode(rgb.convert("RGBA"), "PNG"),
        "palette": _encode(rgb.convert("P"), "PNG"),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "float": _encode(Image.fromarray(rng.normal(size=(h, w)).astype(np.float32), "F"), "TIFF"),
    }


def training_array(raw: bytes, cfg: DataConfig, spec: PreprocessSpec) -> np.ndarray:
    image, _ = decode_image_bytes(raw, ".png", cfg)
    stored = io.BytesIO()
    image.save(stored, format="PNG")  # what ingest writes under data/processed/images/
    with Image.open(io.BytesIO(stored.getvalue())) as processed:
        processed.load()
        return preprocess_image(processed, spec)


def line_array(raw: bytes, spec: PreprocessSpec) -> np.ndarray:
    metadata = {**spec.onnx_metadata(), "input_channels": str(spec.input_channels)}
    return line.preprocess(line.load_image(raw), line.parse_preprocess_spec(metadata))


@pytest.mark.parametrize(("mode", "channels"), [("L", 3), ("L", 1), ("RGB", 3)])
@pytest.mark.parametrize(("source_size", "image_size", "input_size"), [
    ((200, 200), 200, 128),  # the defaults on NEU-sized images: ingest keeps 200, the classifier resizes
    ((320, 240), 96, 96),  # any source size when data.image_size == classifier.input_size
])
def test_ingest_then_training_equals_the_line_on_the_raw_file(mode, channels, source_size, image_size,
                                                              input_size):
    cfg = DataConfig(image_size=image_size, color_mode=mode)
    spec = PreprocessSpec(class_names=["a", "b"], input_size=(input_size, input_size), channel_mode=mode,
                          input_channels=channels, mean=[0.485, 0.456, 0.406][:channels],
                          std=[0.229, 0.224, 0.225][:channels])
    for label, raw in _inputs(source_size).items():
        trained, served = training_array(raw, cfg, spec), line_array(raw, spec)
        assert trained.dtype == served.dtype == np.float32 and trained.shape == served.shape
        np.testing.assert_array_equal(trained, served, err_msg=label)


def test_full_range_16_bit_is_stretched_on_the_line_not_clipped():
    # The probe: a full-range I;16 gradient gave 255 for 99.6% of pixels on the line.
    gradient = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    img = line.load_image(_encode(Image.fromarray(gradient), "PNG"))
    assert img.mode == "I;16"
    plane = np.asarray(line.images.to_channel_mode(img, "L"))
    assert (plane == 255).mean() < 0.01 and plane.min() == 0 and plane.max() == 255


def test_ingest_and_the_line_bound_a_files_parse_cost_with_the_same_limits():
    """The two packages cannot import each other, so decoding.py keeps its own copy of the line's limits: kept equal."""
    from PIL import PngImagePlugin
    from stablesdg_line import images

    import stablesdg.decoding as decoding

    for name in ("ALLOWED_FORMATS", "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_PIXELS", "MAX_TIFF_STRIPS",
                 "MAX_METADATA_BYTES", "MAX_PNG_CHUNKS"):
        assert getattr(decoding, name) == getattr(images, name), name
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == (
        images.MAX_TEXT_CHUNK_BYTES, images.MAX_TEXT_TOTAL_BYTES)
