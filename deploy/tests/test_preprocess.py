"""Preprocessing numbers checked against hand computation of the contract's formula."""

import io
import json

import numpy as np
import pytest
from corpus import image_bytes
from onnx_models import RGB
from PIL import Image

from stablesdg_line import ImageRejected, load_image, load_images_as_batch, parse_preprocess_spec, preprocess


def spec_for(channel_mode: str, channels: int, size=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.2)):
    metadata = {**RGB.metadata(), "channel_mode": channel_mode, "input_channels": str(channels),
                "input_size": json.dumps(list(size)), "mean": json.dumps(list(mean[:channels])),
                "std": json.dumps(list(std[:channels]))}
    return parse_preprocess_spec(metadata)


def test_rgb_pixels_scaled_normalised_and_chw():
    pixels = np.array([[(255, 0, 51), (0, 0, 0)], [(255, 255, 255), (102, 153, 204)]], dtype=np.uint8)
    x = preprocess(Image.fromarray(pixels, "RGB"), spec_for("RGB", 3))
    # (p/255 - mean) / std per channel, by hand: R std .25, G std .5, B std .2, all means .5
    expected = np.array([[[2.0, -2.0], [2.0, -0.4]],
                         [[-1.0, -1.0], [1.0, 0.2]],
                         [[-1.5, -2.5], [2.5, 1.5]]], dtype=np.float32)
    assert x.dtype == np.float32 and x.shape == (3, 2, 2)
    np.testing.assert_allclose(x, expected, atol=1e-6)


def test_gray_plane_is_replicated_for_three_channel_models():
    gray = Image.fromarray(np.array([[0, 51], [255, 204]], dtype=np.uint8), "L")
    x = preprocess(gray, spec_for("L", 3, mean=(0.2, 0.2, 0.2), std=(0.2, 0.4, 0.8)))
    plane = np.array([[0.0, 0.2], [1.0, 0.8]])
    for channel, std in enumerate((0.2, 0.4, 0.8)):
        np.testing.assert_allclose(x[channel], (plane - 0.2) / std, atol=1e-6)


def test_colour_image_is_converted_to_gray_first():
    # PIL's L = (299 R + 587 G + 114 B) / 1000 -> pure red becomes 76
    x = preprocess(Image.new("RGB", (2, 2), (255, 0, 0)), spec_for("L", 1, mean=(0.0,), std=(1.0,)))
    assert x.shape == (1, 2, 2)
    np.testing.assert_allclose(x, np.full((1, 2, 2), 76 / 255), atol=1e-7)


def test_bilinear_resize_of_whole_image_without_crop():
    # 2x2 -> 1x1 bilinear averages the four pixels: (0 + 100 + 200 + 255) / 4 = 138.75 -> 139
    img = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), "L")
    x = preprocess(img, spec_for("L", 1, size=(1, 1), mean=(0.5,), std=(0.5,)))
    np.testing.assert_allclose(x, [[[(139 / 255 - 0.5) / 0.5]]], atol=1e-6)


def test_non_square_target_uses_height_width_order():
    x = preprocess(Image.new("RGB", (50, 40), (0, 0, 0)), spec_for("RGB", 3, size=(3, 5)))
    assert x.shape == (3, 3, 5)


def test_load_images_as_batch_matches_per_image_preprocessing(tmp_path):
    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (9, 9, 9)]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image_bytes(colour))
    spec = spec_for("RGB", 3, size=(8, 8))
    batch = load_images_as_batch(paths, spec)
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for row, path in zip(batch, paths, strict=True):
        np.testing.assert_array_equal(row, preprocess(Image.open(path), spec))


def test_load_images_as_batch_raises_on_bad_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageRejected, match="not a recognised image format"):
        load_images_as_batch([bad], spec_for("RGB", 3))


def test_load_image_accepts_bytes_and_streams():
    data = image_bytes((1, 2, 3))
    assert load_image(data).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(io.BytesIO(data)).size == (32, 24)
