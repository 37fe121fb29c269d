"""An adaptation's state beyond one uninterrupted process: the data-parallel replicas and the checkpoints.

Replicas: accelerate's process state (one process, or N under `accelerate launch`), gradient averaging, the
per-rank seed parts and the end-of-run check that every replica holds the same weights.

Checkpoints: the fingerprint a checkpoint must match to be resumed, the trainable weights it holds, and its
atomic save and load. `adaptation.py` runs the training loops and calls these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import gather, reduce

from .config import Params
from .preflight import base_model_fingerprint
from .utils import sha256_file

if TYPE_CHECKING:
    from .adaptation import ClassData, TrainState


# --------------------------------------------------------------------------------------- replicas
def process_state() -> PartialState:
    """Accelerate's process state: one process normally, N data-parallel ones under `accelerate launch`.

    Without CUDA, `cpu=True` lets the processes form a gloo group instead of each running alone.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Data parallelism: every process steps with the mean gradient, so all replicas stay identical."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.copy_(reduce(p.grad, "mean"))


def check_replicas_in_sync(pipe) -> None:
    """All processes must end with the same trainable weights; a mismatch means gradients were not averaged."""
    checksum = torch.stack([p.detach().double().sum() for p in trainable_state(pipe).values()]).sum()
    every = gather(checksum.reshape(1).to(pipe.unet.device))
    if not torch.allclose(every, every[0].expand_as(every), rtol=0, atol=1e-9):
        raise RuntimeError(f"adaptation replicas diverged: per-process weight checksums {every.tolist()}")


def rank_parts(dist) -> tuple:
    """Seed parts that give each process its own batch; empty for one process, so its seeds never change."""
    return (f"rank{dist.process_index}",) if dist.num_processes > 1 else ()


# --------------------------------------------------------------------------------------- checkpoints
def checkpoint_fingerprint(params: Params, data: ClassData) -> str:
    """What the adaptation depends on: a checkpoint made under another fingerprint is not resumed."""
    parts = {
        "seed": params.seed, "model": asdict(params.model), "base_model": base_model_fingerprint(params.model),
        "adapt": asdict(params.adapt),
        "class": asdict(params.class_config(data.name)), "files": [sha256_file(f) for f in data.files],
    }
    if process_state().num_processes > 1:  # N replicas make an N-times larger batch: not the same run
        parts["num_processes"] = process_state().num_processes
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def trainable_state(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{n}": p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    state.update({f"text.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()
                  if p.requires_grad or "embeddings.token_embedding" in n})
    return state


def restore_trainable(pipe, state: dict[str, torch.Tensor]) -> None:
    named = {f"unet.{n}": p for n, p in pipe.unet.named_parameters()}
    named.update({f"text.{n}": p for n, p in pipe.text_encoder.named_parameters()})
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value)


def save_checkpoint(path: Path, pipe, optimizer, state: TrainState, fp: str, losses: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fp, "stage": state.stage, "step": state.step, "losses": list(losses),
                "weights": trainable_state(pipe),
                "optimizer": optimizer.state_dict() if optimizer else None}, tmp)
    tmp.replace(path)  # atomic: a kill during the save leaves the previous checkpoint intact


def load_checkpoint(path: Path, fp: str) -> dict | None:
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt if ckpt.get("fingerprint") == fp else None
