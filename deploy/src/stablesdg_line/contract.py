"""The ONNX model contract: all preprocessing is read from the model's metadata_props, nothing is assumed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PREPROCESSING_KEYS = ("class_names", "input_size", "channel_mode", "input_channels", "mean", "std", "resize")
# Traceability keys: shown and reported, but a model without them still runs (reported as "unknown").
DESCRIPTIVE_KEYS = ("model_name", "model_version", "data_hash", "weights_sha256", "stablesdg_version",
                    "quantized", "opset")
# Provenance keys (src/stablesdg/provenance.py PROVENANCE_KEYS): where the model came from and what it scored.
# Flat strings, read with onnxruntime alone; "unknown" in a model exported before they existed.
PROVENANCE_KEYS = ("git_commit", "git_dirty", "data_hash", "synthetic_hash", "prior_recipe_sha256",
                   "adapter_sha256", "test_set_sha256", "test_accuracy", "test_macro_f1",
                   "gain_macro_f1_mean", "gain_macro_f1_std", "gain_repeats", "mean_fid", "mean_kid",
                   "feature_net", "mlflow_run_id", "parity_max_abs_diff", "parity_top1_agreement",
                   "parity_images", "int8_decision", "int8_reason")
SUPPORTED_RESIZE = ("bilinear",)
# A classifier input is a few hundred pixels a side; anything near this is a broken export, and a huge size
# with dynamic graph dims would only fail later, at warm-up, with a MemoryError.
MAX_INPUT_SIDE = 4096
# Smallest |std| accepted: below it (e.g. 1e-45) normalised pixels overflow float32 and every score is NaN.
MIN_STD = 1e-6
# The pipeline's own rule for class names (src/stablesdg/config.py CLASS_NAME_PATTERN, at most 64 characters):
# a name it would refuse, e.g. one with escape sequences or newlines, cannot come from a real export.
CLASS_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
MAX_CLASS_NAME_LENGTH = 64
# Contract values are short JSON; a megabyte of nesting is a hostile file (json.loads recurses per level).
MAX_METADATA_VALUE_BYTES = 64 * 1024


class ModelContractError(ValueError):
    """The model file does not follow the StableSDG ONNX contract (missing or invalid metadata, wrong I/O)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an image into one row of the model input, exactly as the exporter trained/exported it."""

    class_names: tuple[str, ...]
    height: int
    width: int
    channel_mode: str  # PIL mode the image is converted to first: "L" or "RGB"
    input_channels: int
    mean: np.ndarray = field(repr=False)  # shape [input_channels], float32
    std: np.ndarray = field(repr=False)
    resize: str = "bilinear"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.input_channels, self.height, self.width


def _required(metadata: dict[str, str], key: str) -> str:
    if key not in metadata:
        raise ModelContractError(f"model metadata is missing the required key '{key}' "
                                 f"(needed for preprocessing; present keys: {sorted(metadata)})")
    return metadata[key]


def _json(metadata: dict[str, str], key: str):
    raw = _required(metadata, key)
    if len(raw) > MAX_METADATA_VALUE_BYTES:
        raise ModelContractError(f"model metadata '{key}' is {len(raw)} characters long, above the "
                                 f"{MAX_METADATA_VALUE_BYTES} a contract value can need")
    try:
        return json.loads(raw)
    except RecursionError as err:
        raise ModelContractError(f"model metadata '{key}' is JSON nested too deeply to be a contract "
                                 "value") from err
    except json.JSONDecodeError as err:
        raise ModelContractError(f"model metadata '{key}' is not valid JSON: {raw[:200]!r}") from err


def _float_vector(metadata: dict[str, str], key: str, length: int) -> np.ndarray:
    values = _json(metadata, key)  # json.loads accepts NaN and Infinity: checked below
    if (not isinstance(values, list) or len(values) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ModelContractError(f"model metadata '{key}' must be a JSON list of {length} numbers, "
                                 f"got {values!r}")
    vector = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(vector)) or np.any(np.abs(vector) > 1e6):
        raise ModelContractError(f"model metadata '{key}' must hold finite numbers of magnitude <= 1e6, "
                                 f"got {values!r}")
    return vector.astype(np.float32)


def _class_names(metadata: dict[str, str]) -> tuple[str, ...]:
    names = _json(metadata, "class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelContractError("model metadata 'class_names' must be a non-empty JSON list of strings, "
                                 f"got {names!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelContractError(f"model metadata 'class_names' lists {duplicates} more than once; "
                                 "each logit needs its own name")
    if any(not n.strip() for n in names):
        raise ModelContractError(f"model metadata 'class_names' contains an empty name: {names!r}")
    refused = [n for n in names if not CLASS_NAME_PATTERN.fullmatch(n) or len(n) > MAX_CLASS_NAME_LENGTH]
    if refused:
        raise ModelContractError(f"model metadata 'class_names' has names the pipeline refuses: {refused!r} "
                                 f"(each must match {CLASS_NAME_PATTERN.pattern}, at most "
                                 f"{MAX_CLASS_NAME_LENGTH} characters)")
    return tuple(names)


def _input_size(metadata: dict[str, str]) -> tuple[int, int]:
    size = _json(metadata, "input_size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ModelContractError(f"model metadata 'input_size' must be JSON [H, W] of positive ints, "
                                 f"got {size!r}")
    if max(size) > MAX_INPUT_SIDE:
        raise ModelContractError(f"model metadata 'input_size' {size} is larger than {MAX_INPUT_SIDE} "
                                 "pixels a side; this is not a line classifier's input")
    return size[0], size[1]


def _channels(metadata: dict[str, str]) -> tuple[str, int]:
    mode = _required(metadata, "channel_mode")
    channels = _required(metadata, "input_channels")
    if mode not in ("L", "RGB"):
        raise ModelContractError(f"model metadata 'channel_mode' must be 'L' or 'RGB', got {mode!r}")
    if channels not in ("1", "3"):
        raise ModelContractError(f"model metadata 'input_channels' must be '1' or '3', got {channels!r}")
    if mode == "RGB" and channels == "1":
        raise ModelContractError("model metadata: channel_mode 'RGB' with input_channels 1 is undefined")
    return mode, int(channels)


def parse_preprocess_spec(metadata: dict[str, str]) -> PreprocessSpec:
    """Build the spec from ONNX custom metadata; raises ModelContractError naming the missing/invalid key."""
    for key in PREPROCESSING_KEYS:
        _required(metadata, key)
    mode, channels = _channels(metadata)
    height, width = _input_size(metadata)
    std = _float_vector(metadata, "std", channels)
    if np.any(std == 0):
        raise ModelContractError(f"model metadata 'std' contains a zero: {std.tolist()}")
    if np.any(np.abs(std) < MIN_STD):
        raise ModelContractError(f"model metadata 'std' {std.tolist()} has a value below {MIN_STD}: "
                                 "normalised pixels would overflow")
    resize = metadata["resize"]
    if resize not in SUPPORTED_RESIZE:
        raise ModelContractError(f"model metadata 'resize' is {resize!r}; supported: {SUPPORTED_RESIZE}")
    return PreprocessSpec(class_names=_class_names(metadata), height=height, width=width, channel_mode=mode,
                          input_channels=channels, mean=_float_vector(metadata, "mean", channels), std=std,
                          resize=resize)


def descriptive_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The traceability fields, "unknown" where the exporter did not write them."""
    return {key: metadata.get(key, "unknown") for key in DESCRIPTIVE_KEYS}


def provenance_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The provenance fields, "unknown" where the exporter did not write them (an older export)."""
    return {key: metadata.get(key, "unknown") for key in PROVENANCE_KEYS}
