"""Classifier: right classes, softmax scores, batch == single, per-file errors, sha256 pinning, no torch."""

import shutil
import sys

import numpy as np
import pytest
from corpus import BLUE, GREEN, RED, image_bytes
from PIL import Image

from stablesdg_line import Classifier, ModelIntegrityError, RuntimeOptions, sha256_hex


def test_import_torch_is_blocked_and_runtime_still_works(rgb_model):
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401
    prediction = Classifier(rgb_model).classify([Image.new("RGB", (8, 8), RED)])[0]
    assert prediction.label == "red_defect"
    loaded = [name for name, module in sys.modules.items()
              if name.split(".")[0] in ("torch", "torchvision") and module is not None]
    assert loaded == []


def test_solid_colours_get_their_class_with_exact_softmax(rgb_model):
    classifier = Classifier(rgb_model)
    pure = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    predictions = classifier.classify(pure, names=["r", "g", "b"])
    assert [p.label for p in predictions] == ["red_defect", "green_defect", "blue_defect"]
    # normalised pure red is [1, -1, -1]; W = 10 I -> logits [10, -10, -10]
    expected_top = 1 / (1 + 2 * np.exp(-20.0))
    for p in predictions:
        assert p.ok and p.model_version == "7" and p.latency_ms > 0
        assert p.confidence == pytest.approx(expected_top, rel=1e-6)
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-9)
        assert list(p.scores) == ["red_defect", "green_defect", "blue_defect"]


@pytest.mark.parametrize("model_fixture", ["gray3_model", "gray1_model"])
def test_gray_models(request, model_fixture):
    classifier = Classifier(request.getfixturevalue(model_fixture))
    predictions = classifier.classify([Image.new("L", (9, 9), 250), Image.new("RGB", (9, 9), (5, 5, 5))])
    assert [p.label for p in predictions] == ["bright", "dark"]


def test_batch_results_equal_single_results(rgb_model):
    classifier = Classifier(rgb_model)
    images = [Image.new("RGB", (16, 12), c) for c in (RED, GREEN, BLUE, (120, 130, 90), (0, 0, 0))]
    batch = classifier.classify(images)
    singles = [classifier.classify([img])[0] for img in images]
    for b, s in zip(batch, singles, strict=True):
        assert b.label == s.label
        np.testing.assert_allclose(list(b.scores.values()), list(s.scores.values()), rtol=1e-6, atol=1e-9)


def test_run_batch_has_dynamic_batch_dimension(rgb_model):
    logits = Classifier(rgb_model).run_batch(np.zeros((5, 3, 8, 8), np.float32))
    assert logits.shape == (5, 3)
    np.testing.assert_array_equal(logits, 0)


def test_bad_inputs_are_per_file_errors_not_exceptions(rgb_model, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(GREEN))
    inputs = [good, b"", b"not an image", tmp_path / "missing.png", image_bytes(BLUE)]
    predictions = Classifier(rgb_model).classify(inputs, names=["good", "empty", "text", "missing", "blue"])
    assert [p.label for p in predictions] == ["green_defect", None, None, None, "blue_defect"]
    assert [p.ok for p in predictions] == [True, False, False, False, True]
    assert "not a recognised image format" in predictions[2].error
    assert "not a regular file" in predictions[3].error
    assert predictions[1].scores == {} and predictions[1].to_row()["class"] is None


def test_classify_files_batches_lazily(rgb_model, tmp_path):
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image_bytes(RED if i % 2 else BLUE))
    results = list(Classifier(rgb_model).classify_files(paths, batch_size=3))
    assert [r.file for r in results] == [str(p) for p in paths]
    assert [r.label for r in results] == ["blue_defect", "red_defect"] * 3 + ["blue_defect"]


def test_pinned_sha256_accepts_the_released_model(rgb_model):
    digest = sha256_hex(rgb_model.read_bytes())
    classifier = Classifier(rgb_model, RuntimeOptions(expected_sha256=digest.upper()))
    assert classifier.sha256 == digest
    assert classifier.describe()["sha256"] == digest


def test_tampered_model_is_refused(rgb_model, tmp_path):
    digest = sha256_hex(rgb_model.read_bytes())
    tampered = tmp_path / "tampered.onnx"
    data = bytearray(rgb_model.read_bytes())
    data[-5] ^= 0x01  # one bit in the metadata strings: still loads fine without pinning
    tampered.write_bytes(bytes(data))
    Classifier(tampered)
    with pytest.raises(ModelIntegrityError, match=f"expected {digest}"):
        Classifier(tampered, RuntimeOptions(expected_sha256=digest))


def test_different_model_is_refused(rgb_model, gray1_model, tmp_path):
    swapped = tmp_path / "rgb.onnx"
    shutil.copy(gray1_model, swapped)
    with pytest.raises(ModelIntegrityError, match="refusing model"):
        Classifier(swapped, RuntimeOptions(expected_sha256=sha256_hex(rgb_model.read_bytes())))


@pytest.mark.parametrize("pin", ["", "abc", "g" * 64])
def test_malformed_pin_is_refused_not_ignored(rgb_model, pin):
    with pytest.raises(ModelIntegrityError, match="must be 64 hex characters"):
        Classifier(rgb_model, RuntimeOptions(expected_sha256=pin))


def test_thread_count_and_warmup_are_configurable(rgb_model):
    classifier = Classifier(rgb_model, RuntimeOptions(threads=2, warmup_runs=0))
    assert classifier.session.get_session_options().intra_op_num_threads == 2
    assert classifier.classify([Image.new("RGB", (4, 4), BLUE)])[0].label == "blue_defect"


def test_pixel_limit_rejects_large_images(rgb_model):
    classifier = Classifier(rgb_model, RuntimeOptions(max_pixels=100))
    small, large = classifier.classify([image_bytes(RED, size=(10, 10)), image_bytes(RED, size=(11, 10))])
    assert small.label == "red_defect"
    assert "110 pixels, above the limit of 100" in large.error
