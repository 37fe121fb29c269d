"""The classifier's input contract, shared by training-side evaluation, the ONNX metadata and the line runtime.

Evaluation in training, the ONNX parity check and `deploy/` all use exactly this preprocessing, so a model
answers the same on the line as in the MLflow run that approved it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreprocessSpec:
    class_names: list[str]
    input_size: tuple[int, int]  # (H, W)
    channel_mode: str = "L"  # PIL mode the image is converted to first
    input_channels: int = 3  # gray planes are replicated to this many channels
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    resize: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        d = dict(d)
        d["input_size"] = tuple(d["input_size"])
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def onnx_metadata(self) -> dict[str, str]:
        """The preprocessing keys of the ONNX `metadata_props` contract (strings, JSON where structured)."""
        return {
            "class_names": json.dumps(self.class_names),
            "input_size": json.dumps(list(self.input_size)),
            "channel_mode": self.channel_mode,
            "input_channels": str(self.input_channels),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "resize": self.resize,
        }


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image -> normalised float32 CHW array, exactly as the line runtime does it."""
    h, w = spec.input_size
    img = img.convert(spec.channel_mode).resize((w, h), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = np.repeat(x[None], spec.input_channels, axis=0) if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std
