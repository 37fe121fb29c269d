"""Model contract: all preprocessing comes from metadata; broken models are refused with a clear reason."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from onnx_models import GRAY_1CH, GRAY_TO_RGB, RGB, write_model
from PIL import Image

from stablesdg_line import Classifier, ModelContractError
from stablesdg_line.contract import PREPROCESSING_KEYS, parse_preprocess_spec


def test_spec_is_read_from_metadata(rgb_model):
    spec = Classifier(rgb_model).spec
    assert spec.class_names == ("red_defect", "green_defect", "blue_defect")
    assert (spec.height, spec.width, spec.channel_mode, spec.input_channels) == (8, 8, "RGB", 3)
    np.testing.assert_array_equal(spec.mean, [0.5, 0.5, 0.5])
    assert spec.input_shape == (3, 8, 8)


@pytest.mark.parametrize("missing", PREPROCESSING_KEYS)
def test_missing_preprocessing_key_is_named(tmp_path, missing):
    model = write_model(replace(RGB, drop_keys=(missing,)), tmp_path / "incomplete.onnx")
    with pytest.raises(ModelContractError, match=f"missing the required key '{missing}'"):
        Classifier(model)


def test_missing_descriptive_keys_still_run_as_unknown(tmp_path):
    model = write_model(replace(RGB, drop_keys=("model_version", "data_hash")), tmp_path / "bare.onnx")
    classifier = Classifier(model)
    assert classifier.model_version == "unknown"
    assert classifier.describe()["data_hash"] == "unknown"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"channel_mode": "CMYK"}, "'channel_mode' must be 'L' or 'RGB'"),
    ({"input_channels": "2"}, "'input_channels' must be '1' or '3'"),
    ({"std": json.dumps([0.5, 0.0, 0.5])}, "'std' contains a zero"),
    ({"mean": json.dumps([0.5])}, "'mean' must be a JSON list of 3 numbers"),
    ({"resize": "nearest"}, "'resize' is 'nearest'"),
    ({"input_size": json.dumps([8])}, "'input_size' must be JSON \\[H, W\\]"),
    ({"class_names": "scratch,inclusion"}, "'class_names' is not valid JSON"),
    ({"class_names": json.dumps([])}, "'class_names' must be a non-empty"),
])
def test_invalid_metadata_values_are_refused(overrides, message):
    metadata = {**RGB.metadata(), **overrides}
    with pytest.raises(ModelContractError, match=message):
        parse_preprocess_spec(metadata)


def test_rgb_mode_with_one_channel_is_refused():
    metadata = {**GRAY_1CH.metadata(), "channel_mode": "RGB"}
    with pytest.raises(ModelContractError, match="'RGB' with input_channels 1"):
        parse_preprocess_spec(metadata)


def test_graph_disagreeing_with_metadata_is_refused(tmp_path):
    one_channel = {"input_channels": "1", "mean": "[0.5]", "std": "[0.5]"}
    model = write_model(replace(GRAY_TO_RGB, metadata_overrides=one_channel), tmp_path / "mismatch.onnx")
    with pytest.raises(ModelContractError, match="model input channels is 3 but metadata implies 1"):
        Classifier(model)


def test_class_count_disagreeing_with_logits_is_refused(tmp_path):
    names = json.dumps(["a", "b"])
    model = write_model(replace(RGB, metadata_overrides={"class_names": names}), tmp_path / "classes.onnx")
    with pytest.raises(ModelContractError, match="3 logits but metadata lists 2 classes"):
        Classifier(model)


def test_not_an_onnx_file_is_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(ModelContractError, match="onnxruntime cannot load"):
        Classifier(junk)


# Issue 14.5: metadata that used to load and then gave NaN confidences, a silently dropped class or a
# MemoryError traceback at warm-up. Each is refused at load, exit 2, naming the key.
@pytest.mark.parametrize(("overrides", "dynamic", "key"), [
    ({"mean": "[NaN, 0.5, 0.5]"}, False, "'mean' must hold finite numbers"),
    ({"mean": "[Infinity, 0.5, 0.5]"}, False, "'mean' must hold finite numbers"),
    ({"std": "[1e-45, 0.5, 0.5]"}, False, "'std' .* has a value below 1e-06"),
    ({"std": '[0.5, "0.5", 0.5]'}, False, "'std' must be a JSON list of 3 numbers"),
    ({"class_names": json.dumps(["red_defect", "red_defect", "blue_defect"])}, False,
     "'class_names' lists \\['red_defect'\\] more than once"),
    ({"input_size": "[100000, 100000]"}, True, "'input_size' \\[100000, 100000\\] is larger than 4096"),
    ({"input_size": "[true, 8]"}, False, "'input_size' must be JSON \\[H, W\\]"),
])
def test_bad_metadata_is_refused_at_load_with_exit_2(tmp_path, capsys, overrides, dynamic, key):
    from stablesdg_line.cli import EXIT_MODEL_REFUSED, main

    recipe = replace(RGB, metadata_overrides=overrides, dynamic_hw=dynamic)
    model = write_model(recipe, tmp_path / "bad.onnx")
    image = tmp_path / "x.png"
    image.write_bytes(b"unused")
    assert main(["classify", str(model), str(image)]) == EXIT_MODEL_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("stablesdg-line: error: model metadata") and "Traceback" not in err
    assert re.search(key, err), err


def test_model_with_dynamic_size_runs_at_the_metadata_size(tmp_path):
    model = write_model(replace(RGB, dynamic_hw=True, metadata_overrides={"input_size": "[16, 24]"}),
                        tmp_path / "dyn.onnx")
    classifier = Classifier(model)
    assert classifier.spec.input_shape == (3, 16, 24)
    assert classifier.classify([Image.new("RGB", (5, 5), (250, 0, 0))])[0].label == "red_defect"
