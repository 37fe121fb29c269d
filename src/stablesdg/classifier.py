"""Defect classifier: a torchvision backbone trained on real (+ synthetic) images, real-only as the baseline.

The model, the data and the train and evaluate code (`stages/train.py` logs the runs and registers): backbones,
image sets, augmentation, metrics, training with early stopping, the saved weights. The real-vs-synthetic
design lives in `comparison.py`; the backbone's corpus pretraining in `pretraining/backbone.py`. Evaluation inputs go through `preprocess.preprocess_image`, byte-for-byte what the ONNX
line runtime does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import get_model, get_model_weights
from tqdm import tqdm

from .config import BACKBONES, ClassifierConfig
from .data import split_paths, synthetic_paths
from .errors import StableSDGError
from .imagenet import LITE_WEIGHTS, build_lite
from .preprocess import PreprocessSpec, preprocess_image
from .utils import canonical_safetensors_header, derive_seed, pick_device, seed_everything, sha256_file
from .viz import image_grid

BRIGHTNESS_JITTER = 0.08  # additive, in [0, 1] pixel units: lighting drift on the line
CONTRAST_JITTER = 0.1  # multiplicative around the image mean


class PretrainedWeightsError(StableSDGError, FileNotFoundError):
    """`classifier.pretrained: true` but the ImageNet weights file is not on this machine."""


# --------------------------------------------------------------------------------------- backbones
def weights_file_name(backbone: str) -> str:
    """The file torchvision would download for the backbone's default ImageNet weights."""
    return Path(get_model_weights(backbone).DEFAULT.url).name


def resolve_weights(backbone: str, weights_path: str | None) -> Path:
    name = weights_file_name(backbone)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / name
    candidates = [Path(weights_path)] if weights_path else []
    if weights_path and Path(weights_path).is_dir():
        candidates = [Path(weights_path) / name]
    for path in [*candidates, hub_file]:
        if path.is_file():
            return path
    url = get_model_weights(backbone).DEFAULT.url
    raise PretrainedWeightsError(
        f"classifier.pretrained is true but the ImageNet weights for {backbone} ({name}) were not found"
        f"{f' at {candidates[0]}' if candidates else ''} nor at {hub_file}. This machine cannot download them: "
        f"fetch {url} elsewhere and copy it to {hub_file} (or set classifier.weights_path to the file), "
        "or set classifier.pretrained: false."
    )


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (fc / classifier[-1]) for one with `num_classes` outputs."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    return model


def build_backbone(
    backbone: str, num_classes: int, pretrained: bool | str = False, weights_path: str | None = None
) -> nn.Module:
    """A torchvision classifier with a `num_classes` head; ImageNet weights from the local cache if asked."""
    if backbone not in BACKBONES:
        raise ValueError(f"classifier.backbone: {backbone!r} is not supported; use one of {', '.join(BACKBONES)}")
    if backbone in LITE_WEIGHTS:
        surface_file = bool(pretrained) and weights_path is not None and Path(weights_path).suffix == ".safetensors"
        model = _replace_head(build_lite(backbone, bool(pretrained) and not surface_file, weights_path), num_classes)
        return load_body_weights(model, Path(weights_path)) if surface_file and weights_path else model
    if not pretrained:
        return get_model(backbone, weights=None, num_classes=num_classes)
    if weights_path and Path(weights_path).suffix == ".safetensors":
        return load_body_weights(get_model(backbone, weights=None, num_classes=num_classes), Path(weights_path))
    model = get_model(backbone, weights=None)
    state = torch.load(resolve_weights(backbone, weights_path), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return _replace_head(model, num_classes)


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the last Linear layer (the task head: `fc.` or `classifier.3.`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


def load_body_weights(model: nn.Module, path: Path) -> nn.Module:
    """Every weight but the head from a `pretrain_backbone` file; the head stays freshly initialised."""
    if not path.is_file():
        raise PretrainedWeightsError(
            f"classifier.weights_path: {path} not found. Make it with `stablesdg pretrain backbone --corpus DIR "
            f"--out {path}` (see README 'Surface-pretrained backbone'), or set classifier.pretrained: false.")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = head_prefix(model)
    if unexpected or any(not k.startswith(head) for k in missing):
        raise PretrainedWeightsError(
            f"classifier.weights_path: {path} does not fit classifier.backbone "
            f"({len(unexpected)} unexpected, {len(missing)} missing keys, e.g. {(unexpected or missing)[:2]})")
    return model


def make_spec(class_names: Sequence[str], cfg: ClassifierConfig) -> PreprocessSpec:
    # Grey steel images are replicated to 3 planes so ImageNet backbones (and their weights) apply unchanged.
    return PreprocessSpec(class_names=list(class_names), input_size=(cfg.input_size, cfg.input_size))


# --------------------------------------------------------------------------------------- data
@dataclass
class ImageSet:
    """Preprocessed images in memory (few-shot sets are small) with their labels and source files."""

    x: torch.Tensor  # [N, C, H, W] float32, normalised
    y: torch.Tensor  # [N] int64
    paths: list[Path]
    # (epoch, generator) -> the images that epoch trains on, for sets drawn afresh each epoch (replace,
    # two_stage); None: these images every epoch
    draw: Callable[[int, torch.Generator], ImageSet] | None = None

    def for_epoch(self, epoch: int, gen: torch.Generator) -> ImageSet:
        return self.draw(epoch, gen) if self.draw else self

    def __len__(self) -> int:
        return len(self.paths)


def load_images(paths: Sequence[Path], labels: Sequence[int], spec: PreprocessSpec, desc: str = "load") -> ImageSet:
    arrays = []
    for path in tqdm(paths, desc=desc, unit="img", leave=False, disable=len(paths) < 200):
        with Image.open(path) as img:
            arrays.append(preprocess_image(img, spec))
    h, w = spec.input_size
    x = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, spec.input_channels, h, w)
    return ImageSet(x, torch.tensor(list(labels), dtype=torch.int64), list(paths))


def real_split(processed_dir: Path, class_names: Sequence[str], split: str) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        found = split_paths(processed_dir, cls, split)
        paths += found
        labels += [label] * len(found)
    return paths, labels


def synthetic_split(synthetic_dir: Path, class_names: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Every synthetic image of every class and its label (`real_split`'s counterpart for data/synthetic)."""
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        found = synthetic_paths(synthetic_dir, cls)
        paths += found
        labels += [label] * len(found)
    return paths, labels


def sample_synthetic(
    synthetic_dir: Path, class_names: Sequence[str], real_counts: Sequence[int], ratio: float, seed: int
) -> tuple[list[Path], list[int]]:
    """Per class, `ratio` x (real train images of that class) synthetic images, a seeded choice."""
    paths, labels = [], []
    for label, (cls, n_real) in enumerate(zip(class_names, real_counts, strict=True)):
        pool = synthetic_paths(synthetic_dir, cls)
        wanted = len(pool) if math.isinf(ratio) else min(len(pool), round(ratio * n_real))
        rng = np.random.default_rng(derive_seed(seed, "synthetic", cls))
        chosen = sorted(rng.choice(len(pool), size=wanted, replace=False)) if wanted else []
        paths += [pool[i] for i in chosen]
        labels += [label] * wanted
    return paths, labels


def split_hash(paths: Sequence[Path], root: Path) -> str:
    """Hash of a split's file list (relative names) and bytes: two runs on the same test set share it."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(Path(path).resolve().relative_to(root.resolve()).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- augmentation
def _per_sample(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def augment_batch(x: torch.Tensor, spec: PreprocessSpec, gen: torch.Generator) -> torch.Tensor:
    """Flips, 90 degree rotations and small brightness/contrast jitter (steel defects have no orientation)."""
    n = x.shape[0]
    flip_h = (_per_sample(gen, n) < 0.5)[:, None, None, None]
    x = torch.where(flip_h, x.flip(-1), x)
    flip_v = (_per_sample(gen, n) < 0.5)[:, None, None, None]
    x = torch.where(flip_v, x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        turns = torch.randint(0, 4, (n,), generator=gen)
        x = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, turns, strict=True)])
    # Normalisation is affine per channel, so jitter in [0, 1] units maps to these normalised-space ops.
    std = torch.tensor(spec.std, dtype=x.dtype)[None, :, None, None]
    brightness = (_per_sample(gen, n) * 2 - 1) * BRIGHTNESS_JITTER
    contrast = 1 + (_per_sample(gen, n) * 2 - 1) * CONTRAST_JITTER
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean
    return x + brightness[:, None, None, None] / std


# --------------------------------------------------------------------------------------- metrics
@dataclass
class Evaluation:
    accuracy: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    confusion: np.ndarray  # [true, predicted]
    predictions: np.ndarray
    f1: list[float] = field(default_factory=list)  # per class (macro_f1 is their mean over present classes)

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self, class_names: Sequence[str]) -> dict:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {
                c: {"precision": p, "recall": r}
                for c, p, r in zip(class_names, self.precision, self.recall, strict=True)
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> Evaluation:
    confusion: np.ndarray = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = actual > 0  # macro over classes that occur in the evaluated set
    return Evaluation(
        accuracy=float(tp.sum() / max(1, len(y_true))),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        precision=precision.tolist(),
        recall=recall.tolist(),
        confusion=confusion,
        predictions=np.asarray(y_pred),
        f1=f1.tolist(),
    )


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x)
    outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, data: ImageSet, num_classes: int, batch_size: int = 64) -> Evaluation:
    predictions = predict_logits(model, data.x, batch_size).argmax(axis=1)
    return classification_metrics(data.y.numpy(), predictions, num_classes)


# --------------------------------------------------------------------------------------- training
@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_accuracy: float
    val_macro_f1: float


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf


def _optimizer(model: nn.Module, cfg: ClassifierConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.learning_rate, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: ClassifierConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None


def index_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`order` in batches of `batch_size`; a trailing batch of one is merged into the one before (BatchNorm
    cannot compute statistics of one 1x1 map)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches (`index_batches`)."""
    return index_batches(torch.randperm(n, generator=gen), batch_size)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> None:
    """Recompute BatchNorm running statistics as an exact average over the (un-augmented) training images.

    Few-shot sets give only a handful of updates per epoch, and torchvision's MobileNetV3 uses BN momentum
    0.01: its running statistics would stay near their initial values and the eval-mode model would answer
    one class for everything. An exact pass fixes that for every backbone at the cost of one forward pass.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches below
    model.train()
    for idx in index_batches(torch.arange(len(x)), batch_size):
        model(x[idx].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _train_epoch(model, opt, train: ImageSet, cfg: ClassifierConfig, spec, gen, device) -> float:
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    total, seen = 0.0, 0
    for idx in _batches(len(train), cfg.batch_size, gen):
        x = augment_batch(train.x[idx], spec, gen) if cfg.augment else train.x[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x.to(device)), train.y[idx].to(device))
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(1, seen)


def train_classifier(
    train: ImageSet,
    val: ImageSet,
    spec: PreprocessSpec,
    cfg: ClassifierConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train with early stopping on the validation primary metric; returns the best epoch's weights (on CPU)."""
    seed_everything(seed)
    num_classes = len(spec.class_names)
    device = pick_device(cfg.device)
    model = build_backbone(cfg.backbone, num_classes, cfg.pretrained, cfg.weights_path).to(device)
    opt, gen = _optimizer(model, cfg), torch.Generator().manual_seed(seed)
    scheduler = _scheduler(opt, cfg)
    result, best_state, waited = TrainResult(model), copy.deepcopy(model.state_dict()), 0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch"):
        images = train.for_epoch(epoch, gen)
        loss = _train_epoch(model, opt, images, cfg, spec, gen, device)
        if scheduler is not None:
            scheduler.step()
        recalibrate_batchnorm(model, images.x, cfg.batch_size, device)
        scores = evaluate(model, val, num_classes)
        record = EpochRecord(epoch, loss, scores.accuracy, scores.macro_f1)
        result.history.append(record)
        if on_epoch:
            on_epoch(record)
        if scores.metric(cfg.primary_metric) > result.best_score:
            result.best_score, result.best_epoch, waited = scores.metric(cfg.primary_metric), epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    model.load_state_dict(best_state)
    result.model = model.cpu().eval()
    return result


# --------------------------------------------------------------------------------------- outputs
def misclassified_grid(test: ImageSet, predictions: np.ndarray, class_names: Sequence[str],
                       per_row: int = 8) -> Image.Image:
    """Misclassified test images, one row per (true -> predicted) pair."""
    rows: dict[str, list[Image.Image]] = {}
    for path, actual, predicted in zip(test.paths, test.y.tolist(), predictions.tolist(), strict=True):
        if actual != predicted:
            with Image.open(path) as img:
                rows.setdefault(f"{class_names[actual]}->{class_names[predicted]}", []).append(img.convert("RGB"))
    if not rows:
        return image_grid([[Image.new("RGB", (64, 64), "white")]], ["no misclassified test image"])
    labels = sorted(rows)
    return image_grid([rows[k][:per_row] for k in labels], labels)


def save_weights(model: nn.Module, spec: PreprocessSpec, backbone: str, path: Path) -> Path:
    """The trained weights as a DVC-versioned safetensors file (MLflow keeps its own copy): it makes `train` a
    stage with a cached output, so a fresh clone trains (and registers) instead of trusting an empty registry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"backbone": backbone, "preprocess": json.dumps(spec.to_dict())})
    canonical_safetensors_header(path)
    return path


def load_weights(path: Path) -> tuple[nn.Module, PreprocessSpec]:
    """The model and preprocess spec `save_weights` wrote (eval mode, CPU)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    spec = PreprocessSpec.from_dict(json.loads(meta["preprocess"]))
    model = build_backbone(meta["backbone"], len(spec.class_names))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), spec


