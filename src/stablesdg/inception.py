"""The standard FID network: pytorch-fid's port of the TF 2015-12-05 Inception-v3 graph (2048-d pool3 features,
bilinear resize to 299), so numbers are comparable with published FIDs. The weights file cannot be downloaded
here: it is looked up where the hub caches it or where `metrics.inception_weights` points."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FeatureWeightsError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


INCEPTION_ALT_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the same weights


INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE


INCEPTION_SIZE = 299


def _pool_avg(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the padding; torchvision's counts it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _pool_max(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _fid_blocks():
    """torchvision's Inception blocks with the pooling of the TF FID graph (as pytorch-fid patches them)."""
    from torchvision.models.inception import (  # lazy: only Inception needs it
        InceptionA,
        InceptionC,
        InceptionE,
    )

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_pool_avg(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_pool_avg(x))]

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels: int, pool):
            super().__init__(in_channels)
            self.pool = pool  # Mixed_7b averages, Mixed_7c max-pools (a quirk of the TF graph)

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class InceptionPool3(nn.Module):
    """FID Inception-v3 up to pool3: (N, 3, 299, 299) floats in [0, 1] -> (N, 2048)."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import Inception3  # lazy: only Inception needs it

        a, c, e = _fid_blocks()
        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = a(192, 32), a(256, 64), a(288, 64)
        net.Mixed_6b, net.Mixed_6c = c(768, 128), c(768, 160)
        net.Mixed_6d, net.Mixed_6e = c(768, 160), c(768, 192)
        net.Mixed_7b, net.Mixed_7c = e(1280, _pool_avg), e(2048, _pool_max)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = 2 * x - 1  # the network's own input scaling ([-1, 1])
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(configured: str | None) -> Path:
    """The weights file: `metrics.inception_weights`, else torch hub's checkpoints folder (either name)."""
    candidates = [Path(configured)] if configured else [_hub_checkpoints() / INCEPTION_FILE,
                                                        _hub_checkpoints() / INCEPTION_ALT_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FeatureWeightsError(
        f"FID Inception weights {INCEPTION_FILE} not found (looked at: {', '.join(map(str, candidates))}). "
        f"This machine cannot download it: on one with network fetch {INCEPTION_URL} (torch-fidelity's copy, "
        f"named {INCEPTION_ALT_FILE}) or {PYTORCH_FID_URL}, then put it in {_hub_checkpoints()}/ or set "
        "`metrics.inception_weights: PATH` in params.yaml. Or set `metrics.feature_net: surface`."
    )


def load_inception(configured: str | None) -> tuple[InceptionPool3, Path]:
    path = find_inception_weights(configured)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = InceptionPool3()
    result = model.net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("AuxLogits.")]
    if missing or unexpected:
        raise FeatureWeightsError(f"{path}: not the FID Inception weights (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); expected {INCEPTION_FILE}")
    return model.eval().requires_grad_(False), path
