"""The classifier backbone's surface-corpus pretraining (the ImageNet stand-in that `classifier.weights_path`
loads): supervised on which source a view comes from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import get_model
from tqdm import tqdm

from ..classifier import augment_batch, head_prefix
from ..preprocess import PreprocessSpec
from ..utils import canonical_safetensors_header, derive_seed, seed_everything


@dataclass
class BackbonePretrainConfig:
    backbone: str = "resnet18"
    input_size: int = 128
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    holdout: float = 0.1
    seed: int = 0


def pretrain_backbone(corpus, cfg: BackbonePretrainConfig, device: str = "cpu",
                      log: Callable[[str, int, float], None] | None = None) -> tuple[nn.Module, dict]:
    """Supervised pretraining on the corpus (which source a view comes from), the ImageNet stand-in.

    Views are random regions at the classifier's input size and texture scale, grey replicated to 3 planes,
    normalised as `PreprocessSpec` does: the same input contract as the defect classifier it initialises.
    """
    log = log or (lambda *_: None)
    spec = PreprocessSpec(class_names=list(corpus.sources), input_size=(cfg.input_size, cfg.input_size))
    mean = torch.tensor(spec.mean)[None, :, None, None]
    std = torch.tensor(spec.std)[None, :, None, None]

    def batch(rng: np.random.Generator, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        grey, _ = corpus.views(rng, len(idx), cfg.input_size, indices=idx)
        x = torch.from_numpy(grey.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
        return (x - mean) / std, torch.tensor([corpus.labels[int(i)] for i in idx])

    seed_everything(cfg.seed)
    train_idx, held_idx = corpus.holdout(cfg.holdout, cfg.seed)
    model = get_model(cfg.backbone, weights=None, num_classes=len(corpus.sources)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    rng, gen = np.random.default_rng(derive_seed("backbone-views", cfg.seed)), torch.Generator().manual_seed(cfg.seed)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=f"backbone epoch {epoch + 1}/{cfg.epochs}"):
            x, y = batch(rng, order[start:start + cfg.batch_size])
            x = augment_batch(x, spec, gen)
            loss = loss_fn(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            log("backbone_loss", step, loss.item())
            step += 1
    model.eval()
    eval_rng = np.random.default_rng(derive_seed("backbone-heldout", cfg.seed))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(held_idx), 128):
            x, y = batch(eval_rng, held_idx[start:start + 128])
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return model.cpu(), {"heldout_accuracy": correct / max(1, len(held_idx)), "heldout_images": len(held_idx),
                         "train_images": len(train_idx), "sources": list(corpus.sources), "steps": step}


def save_body_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """Every weight but the head, as fp16 safetensors (half the size; the loader casts back to float32)."""
    head = head_prefix(model)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items() if not k.startswith(head)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    canonical_safetensors_header(path)
    return path
