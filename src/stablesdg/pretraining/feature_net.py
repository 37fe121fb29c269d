"""The surface feature network's training: which corpus source a view comes from; its embedding is the
FID/KID feature (`metrics.feature_net: surface`; the scoring side lives in `metrics.py`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..metrics import (
    NET_RECORD,
    PREPROCESS_VERSION,
    SURFACE_FILE,
    SURFACE_SIZE,
    EmbeddingNet,
    state_fingerprint,
)
from ..utils import canonical_safetensors_header, derive_seed, sha256_file, write_json


@dataclass
class SurfaceNetRecipe:
    feature_dim: int = 64
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 3e-3
    holdout: float = 0.1
    seed: int = 0
    input_size: int = SURFACE_SIZE
    preprocess: str = PREPROCESS_VERSION


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and 90° turns: surface textures have no preferred orientation."""
    out = x.clone()
    for i in range(len(out)):
        flips = torch.randint(2, (2,), generator=gen).tolist()
        turns = int(torch.randint(4, (1,), generator=gen))
        if flips[0]:
            out[i] = out[i].flip(-1)
        if flips[1]:
            out[i] = out[i].flip(-2)
        out[i] = torch.rot90(out[i], turns, dims=(-2, -1))
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the same floating-point order on every machine, and no spinning thread pools
    (a net this small trains faster single-threaded on a busy 2-core CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _corpus_batch(corpus, rng: np.random.Generator, idx: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    grey, _ = corpus.views(rng, len(idx), size, indices=idx)
    x = torch.from_numpy(grey.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor([corpus.labels[int(i)] for i in idx])


def pretrain_surface_net(corpus, recipe: SurfaceNetRecipe) -> tuple[EmbeddingNet, dict]:
    """Seeded training to tell the corpus sources apart from random views; its embedding is the FID feature.

    Trained on the surface corpus, never on a project's own images: the features, and so every FID/KID figure,
    mean the same for every split, class and data set.
    """
    with _one_thread():
        train_idx, held_idx = corpus.holdout(recipe.holdout, recipe.seed)
        rng = np.random.default_rng(derive_seed("surface-net-views", recipe.seed))
        gen = torch.Generator().manual_seed(derive_seed("surface-net", recipe.seed))
        with torch.random.fork_rng(devices=[]):  # the init must not depend on (or disturb) the global RNG
            torch.manual_seed(derive_seed("surface-net-init", recipe.seed))
            net = EmbeddingNet(recipe.feature_dim, len(corpus.sources))
        opt = torch.optim.Adam(net.parameters(), lr=recipe.learning_rate)
        steps = recipe.epochs * math.ceil(len(train_idx) / recipe.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.learning_rate, total_steps=steps, pct_start=0.1)
        net.train()
        for epoch in range(recipe.epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
            for i in tqdm(range(0, len(order), recipe.batch_size), desc=f"surface net {epoch + 1}/{recipe.epochs}",
                          leave=False):
                x, y = _corpus_batch(corpus, rng, order[i:i + recipe.batch_size], recipe.input_size)
                loss = F.cross_entropy(net.logits(_augment(x, gen)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval().requires_grad_(False)
        eval_rng = np.random.default_rng(derive_seed("surface-net-heldout", recipe.seed))
        correct = 0
        with torch.no_grad():
            for i in range(0, len(held_idx), 256):
                x, y = _corpus_batch(corpus, eval_rng, held_idx[i:i + 256], recipe.input_size)
                correct += int((net.logits(x).argmax(1) == y).sum())
    return net, {"heldout_accuracy": correct / max(1, len(held_idx)), "final_loss": loss.item(),
                 "sources": list(corpus.sources), "train_images": len(train_idx), "heldout_images": len(held_idx)}


def save_surface_net(net: EmbeddingNet, out_dir: Path, record: dict) -> Path:
    """feature_net.safetensors + feature_net.json (recipe, corpus hash, fingerprint, sha256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SURFACE_FILE
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"feature_dim": str(net.num_features), "n_classes": str(net.head[-1].out_features)})
    canonical_safetensors_header(path)
    write_json(out_dir / NET_RECORD, {**record, "feature_net": "surface", "sha256": sha256_file(path),
                                       "fingerprint": state_fingerprint(net, "surface", SURFACE_SIZE)})
    return path
