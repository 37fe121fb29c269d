"""StableSDG line-side runtime: onnxruntime classification of steel-defect images, no torch needed."""

from .classifier import Classifier, ModelIntegrityError, Prediction, RuntimeOptions, sha256_hex, softmax
from .contract import ModelContractError, PreprocessSpec, parse_preprocess_spec
from .images import DEFAULT_MAX_PIXELS, ImageRejected, load_image, load_images_as_batch, preprocess

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Classifier",
    "ImageRejected",
    "ModelContractError",
    "ModelIntegrityError",
    "Prediction",
    "PreprocessSpec",
    "RuntimeOptions",
    "load_image",
    "load_images_as_batch",
    "parse_preprocess_spec",
    "preprocess",
    "sha256_hex",
    "softmax",
]
