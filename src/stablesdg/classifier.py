"""Defect classifier: a torchvision backbone trained on real (+ synthetic) images, real-only as the baseline.

`stablesdg train` trains both variants on the same real splits, evaluates them on the same real test set
(asserted by hash), logs each as an MLflow run and hands the better one to the registry. Evaluation inputs go
through `preprocess.preprocess_image`, byte-for-byte what the ONNX line runtime does.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .config import ClassifierConfig, Params
from .options import load_or_exit, params_option
from .preprocess import PreprocessSpec, preprocess_image
from .utils import (
    canonical_safetensors_header,
    derive_seed,
    pick_device,
    seed_everything,
    sha256_file,
    sha256_tree,
    write_json,
)

BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
             "regnet_x_400mf", "shufflenet_v2_x1_0")
VARIANTS = ("real_only", "real_plus_synthetic")
GAIN_METRICS = ("accuracy", "macro_f1")
SUMMARY_FILE = "summary.json"  # the full train report in --reports; metrics/train.json holds train_metrics()
CHAMPION_FILE = "champion.json"  # champion_param(): the export stage's DVC param
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
BRIGHTNESS_JITTER = 0.08  # additive, in [0, 1] pixel units: lighting drift on the line
CONTRAST_JITTER = 0.1  # multiplicative around the image mean


class PretrainedWeightsError(FileNotFoundError):
    """`classifier.pretrained: true` but the ImageNet weights file is not on this machine."""


# --------------------------------------------------------------------------------------- backbones
def weights_file_name(backbone: str) -> str:
    """The file torchvision would download for the backbone's default ImageNet weights."""
    from torchvision.models import get_model_weights

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
    from torchvision.models import get_model_weights

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
    backbone: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None
) -> nn.Module:
    """A torchvision classifier with a `num_classes` head; ImageNet weights from the local cache if asked."""
    from torchvision.models import get_model

    if backbone not in BACKBONES:
        raise ValueError(f"classifier.backbone: {backbone!r} is not supported; use one of {', '.join(BACKBONES)}")
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
    from safetensors.torch import load_file

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


# --------------------------------------------------------------------------------------- corpus pretraining
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
    from torchvision.models import get_model

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
    from safetensors.torch import save_file

    head = head_prefix(model)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items() if not k.startswith(head)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    canonical_safetensors_header(path)
    return path


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
    from .data import split_paths

    paths, labels = [], []
    for label, cls in enumerate(class_names):
        found = split_paths(processed_dir, cls, split)
        paths += found
        labels += [label] * len(found)
    return paths, labels


def synthetic_images(synthetic_dir: Path, cls: str) -> list[Path]:
    folder = synthetic_dir / cls
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def sample_synthetic(
    synthetic_dir: Path, class_names: Sequence[str], real_counts: Sequence[int], ratio: float, seed: int
) -> tuple[list[Path], list[int]]:
    """Per class, `ratio` x (real train images of that class) synthetic images, a seeded choice."""
    paths, labels = [], []
    for label, (cls, n_real) in enumerate(zip(class_names, real_counts, strict=True)):
        pool = synthetic_images(synthetic_dir, cls)
        wanted = min(len(pool), round(ratio * n_real))
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
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
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


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one is merged (BatchNorm cannot train on one 1x1 map)."""
    order = torch.randperm(n, generator=gen)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


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
    batches = list(torch.arange(len(x)).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    for idx in batches:
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
        loss = _train_epoch(model, opt, train, cfg, spec, gen, device)
        if scheduler is not None:
            scheduler.step()
        recalibrate_batchnorm(model, train.x, cfg.batch_size, device)
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


# --------------------------------------------------------------------------------------- the stage
@dataclass
class Splits:
    """The real splits both variants share, plus the synthetic selection for the augmented one."""

    root: Path  # data/processed: test-set hashes are over paths relative to it
    spec: PreprocessSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet
    test_hash: str
    synthetic: ImageSet | None
    skip_reason: str | None = None


def load_splits(processed_dir: Path, synthetic_dir: Path, params: Params) -> Splits:
    from .data import class_names_in

    cfg = params.classifier
    class_names = class_names_in(processed_dir)
    if len(class_names) < 2:
        raise click.ClickException(f"{processed_dir}: fewer than two classes; run `stablesdg data ingest` first")
    spec = make_spec(class_names, cfg)
    parts = {s: real_split(processed_dir, class_names, s) for s in ("train", "val", "test")}
    if not parts["test"][0] or not parts["val"][0]:
        raise click.ClickException(f"{processed_dir}: the val and test splits must not be empty")
    sets = {s: load_images(p, y, spec, desc=s) for s, (p, y) in parts.items()}
    real_counts = [parts["train"][1].count(i) for i in range(len(class_names))]
    synthetic, reason = None, None
    if cfg.synthetic_ratio <= 0:
        reason = "classifier.synthetic_ratio is 0"
    else:
        paths, labels = sample_synthetic(synthetic_dir, class_names, real_counts, cfg.synthetic_ratio, params.seed)
        if paths:
            synthetic = load_images(paths, labels, spec, desc="synthetic")
        else:
            reason = f"no synthetic images in {synthetic_dir}/<class>/ (run the generate stage first)"
    test_hash = split_hash(parts["test"][0], processed_dir)
    return Splits(processed_dir, spec, sets["train"], sets["val"], sets["test"], test_hash, synthetic, reason)


def combine(a: ImageSet, b: ImageSet | None) -> ImageSet:
    if b is None:
        return a
    return ImageSet(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), [*a.paths, *b.paths])


@dataclass
class VariantResult:
    variant: str
    evaluation: Evaluation
    result: TrainResult
    run_id: str
    model_uri: str
    test_hash: str
    n_train_real: int
    n_train_synthetic: int

    def summary(self, class_names: Sequence[str]) -> dict:
        return {
            **self.evaluation.to_dict(class_names),
            "best_epoch": self.result.best_epoch,
            "epochs_run": len(self.result.history),
            "n_train_real": self.n_train_real,
            "n_train_synthetic": self.n_train_synthetic,
            "run_id": self.run_id,
            "test_set_sha256": self.test_hash,
        }


def write_history_csv(path: Path, history: Sequence[EpochRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "val_accuracy", "val_macro_f1"])
        for r in history:
            writer.writerow([r.epoch, f"{r.train_loss:.6f}", f"{r.val_accuracy:.6f}", f"{r.val_macro_f1:.6f}"])
    return path


def write_confusion_csv(path: Path, test: ImageSet, predictions: np.ndarray, class_names: Sequence[str]) -> Path:
    """One row per test image (DVC's confusion template counts them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        for actual, predicted in zip(test.y.tolist(), predictions.tolist(), strict=True):
            writer.writerow([class_names[actual], class_names[predicted]])
    return path


def misclassified_grid(test: ImageSet, predictions: np.ndarray, class_names: Sequence[str],
                       per_row: int = 8) -> Image.Image:
    """Misclassified test images, one row per (true -> predicted) pair."""
    from .viz import image_grid

    rows: dict[str, list[Image.Image]] = {}
    for path, actual, predicted in zip(test.paths, test.y.tolist(), predictions.tolist(), strict=True):
        if actual != predicted:
            with Image.open(path) as img:
                rows.setdefault(f"{class_names[actual]}->{class_names[predicted]}", []).append(img.convert("RGB"))
    if not rows:
        return image_grid([[Image.new("RGB", (64, 64), "white")]], ["no misclassified test image"])
    labels = sorted(rows)
    return image_grid([rows[k][:per_row] for k in labels], labels)


def model_signature(spec: PreprocessSpec, num_classes: int):
    """Signature with a dynamic (-1) batch dimension for input and logits."""
    from mlflow.models import infer_signature

    h, w = spec.input_size
    example = np.zeros((1, spec.input_channels, h, w), np.float32)
    return infer_signature(example, np.zeros((1, num_classes), np.float32)), example


def log_classifier(model: nn.Module, spec: PreprocessSpec) -> str:
    """Log the model (pickle format: keeps the batch dimension dynamic, unlike pt2) and its preprocess spec."""
    import mlflow
    import torchvision

    signature, example = model_signature(spec, len(spec.class_names))
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=example,
        # Explicit requirements skip MLflow's slow dependency inference subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"],
    )
    mlflow.log_dict(spec.to_dict(), "preprocess.json")
    return info.model_uri


def save_weights(model: nn.Module, spec: PreprocessSpec, backbone: str, path: Path) -> Path:
    """The trained weights as a DVC-versioned safetensors file (MLflow keeps its own copy): it makes `train` a
    stage with a cached output, so a fresh clone trains (and registers) instead of trusting an empty registry."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"backbone": backbone, "preprocess": json.dumps(spec.to_dict())})
    canonical_safetensors_header(path)
    return path


def load_weights(path: Path) -> tuple[nn.Module, PreprocessSpec]:
    """The model and preprocess spec `save_weights` wrote (eval mode, CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    spec = PreprocessSpec.from_dict(json.loads(meta["preprocess"]))
    model = build_backbone(meta["backbone"], len(spec.class_names))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), spec


def _log_evaluation(evaluation: Evaluation, spec: PreprocessSpec, test: ImageSet, variant: str,
                    reports_dir: Path) -> None:
    import mlflow

    from . import tracking
    from .viz import confusion_matrix_image, save_image

    names = spec.class_names
    metrics = {"test_accuracy": evaluation.accuracy, "test_macro_f1": evaluation.macro_f1}
    for cls, p, r in zip(names, evaluation.precision, evaluation.recall, strict=True):
        metrics[f"test_precision_{cls}"], metrics[f"test_recall_{cls}"] = p, r
    mlflow.log_metrics(metrics)
    confusion = confusion_matrix_image(evaluation.confusion, names, f"{variant}: test confusion")
    save_image(confusion, reports_dir / f"confusion_{variant}.png")
    tracking.log_image(confusion, "confusion_matrix.png")
    grid = misclassified_grid(test, evaluation.predictions, names)
    save_image(grid, reports_dir / f"misclassified_{variant}.png")
    tracking.log_image(grid, "misclassified.png")


def variant_synthetic(splits: Splits, variant: str) -> ImageSet | None:
    """The synthetic images a variant trains on (none for the real-only baseline)."""
    return splits.synthetic if variant == "real_plus_synthetic" else None


def train_variant(variant: str, splits: Splits, params: Params, inputs: Sequence[Path],
                  reports_dir: Path, weights_dir: Path | None = None) -> VariantResult:
    """Train, evaluate on the real test set and log one variant as a nested MLflow run."""
    import mlflow

    from . import tracking

    synthetic = variant_synthetic(splits, variant)
    train = combine(splits.train, synthetic)
    test_hash = split_hash(splits.test.paths, splits.root)  # of the images this run is really evaluated on
    tags = {"variant": variant, "test_set_sha256": test_hash, "primary_metric": params.classifier.primary_metric,
            "n_train_real": len(splits.train), "n_train_synthetic": len(synthetic) if synthetic else 0}
    with tracking.stage_run("train", params, inputs, run_name=variant, nested=True, extra_tags=tags) as run:
        def log_epoch(r: EpochRecord) -> None:
            mlflow.log_metrics({"train_loss": r.train_loss, "val_accuracy": r.val_accuracy,
                                "val_macro_f1": r.val_macro_f1}, step=r.epoch)

        result = train_classifier(train, splits.val, splits.spec, params.classifier, params.seed, log_epoch, variant)
        evaluation = evaluate(result.model, splits.test, len(splits.spec.class_names))
        mlflow.log_metrics({"best_epoch": result.best_epoch, f"best_val_{params.classifier.primary_metric}":
                            result.best_score})
        _log_evaluation(evaluation, splits.spec, splits.test, variant, reports_dir)
        write_history_csv(reports_dir / f"history_{variant}.csv", result.history)
        write_confusion_csv(reports_dir / f"confusion_{variant}.csv", splits.test, evaluation.predictions,
                            splits.spec.class_names)
        mlflow.log_artifact(str(reports_dir / f"history_{variant}.csv"))
        model_uri = log_classifier(result.model, splits.spec)
        if weights_dir is not None:
            save_weights(result.model, splits.spec, params.classifier.backbone, weights_dir / f"{variant}.safetensors")
    return VariantResult(variant, evaluation, result, run.info.run_id, model_uri, test_hash,
                         len(splits.train), len(synthetic) if synthetic else 0)


def repeated_gain(splits: Splits, params: Params, first: dict[str, Evaluation]) -> dict:
    """Both variants retrained with `classifier.repeats - 1` more seeds: per-seed test metrics, and the gain's
    mean and sample standard deviation, so a reviewer sees whether the gain is larger than seed noise."""
    cfg = params.classifier
    seeds = [params.seed + r for r in range(cfg.repeats)]
    per_seed = {variant: [first[variant]] for variant in VARIANTS}
    for seed in seeds[1:]:
        for variant in VARIANTS:
            train = combine(splits.train, variant_synthetic(splits, variant))
            result = train_classifier(train, splits.val, splits.spec, cfg, seed, desc=f"{variant} seed {seed}")
            per_seed[variant].append(evaluate(result.model, splits.test, len(splits.spec.class_names)))
    out: dict = {"seeds": seeds}
    for variant in VARIANTS:
        out[variant] = {m: [e.metric(m) for e in per_seed[variant]] for m in GAIN_METRICS}
    for m in GAIN_METRICS:
        gains = np.subtract(out["real_plus_synthetic"][m], out["real_only"][m])
        out[f"gain_{m}"] = gains.tolist()
        out[f"gain_{m}_mean"] = float(gains.mean())
        out[f"gain_{m}_std"] = float(gains.std(ddof=1))
    return out


def gain(augmented: VariantResult, baseline: VariantResult) -> dict[str, float]:
    return {m: augmented.evaluation.metric(m) - baseline.evaluation.metric(m) for m in GAIN_METRICS}


def run_training(params: Params, processed_dir: Path, synthetic_dir: Path, reports_dir: Path,
                 fid_file: Path | None = None, register: bool = True, weights_dir: Path | None = None,
                 fid_report: Path | None = None, grids_dir: Path | None = None) -> dict:
    """Both variants, their comparison, the full train report (`train_metrics` picks the declared metrics from
    it) and (optionally) the registry step with its model card."""
    import mlflow

    from . import registry, tracking

    splits = load_splits(processed_dir, synthetic_dir, params)
    inputs = [processed_dir, synthetic_dir]
    for stale in (weights_dir / f"{v}.safetensors" for v in VARIANTS) if weights_dir else ():
        stale.unlink(missing_ok=True)  # a skipped variant must not leave an older run's weights behind
    summary: dict = {"primary_metric": params.classifier.primary_metric, "test_set_sha256": splits.test_hash,
                     "backbone": params.classifier.backbone, "input_size": params.classifier.input_size}
    extra = {"test_set_sha256": splits.test_hash, "synthetic_sha256": _synthetic_hash(synthetic_dir)}
    with tracking.stage_run("train", params, inputs, run_name="train", extra_tags=extra) as parent:
        results = {"real_only": train_variant("real_only", splits, params, inputs, reports_dir, weights_dir)}
        summary["real_only"] = results["real_only"].summary(splits.spec.class_names)
        if splits.synthetic is None:
            click.echo(f"train: real_plus_synthetic skipped: {splits.skip_reason}")
            summary["real_plus_synthetic"] = {"skipped": True, "reason": splits.skip_reason}
            summary["gain"] = None
        else:
            results["real_plus_synthetic"] = train_variant("real_plus_synthetic", splits, params, inputs, reports_dir,
                                                          weights_dir)
            summary["real_plus_synthetic"] = results["real_plus_synthetic"].summary(splits.spec.class_names)
            summary["gain"] = gain(results["real_plus_synthetic"], results["real_only"])
            mlflow.log_metrics({f"gain_{k}": v for k, v in summary["gain"].items()})
            if params.classifier.repeats > 1:
                summary["repeats"] = repeated_gain(splits, params, {v: r.evaluation for v, r in results.items()})
                mlflow.log_metrics({k: v for k, v in summary["repeats"].items() if k.endswith(("_mean", "_std"))})
        hashes = {r.test_hash for r in results.values()}
        if len(hashes) != 1:
            raise RuntimeError(f"variants were evaluated on different test sets: {hashes}")
        mlflow.set_tag("same_test_set", "true")
        summary["same_test_set"] = True
        if register:
            summary["registered"] = registry.register_best(
                params, list(results.values()), splits, summary.get("gain"), fid_file, parent.info.run_id,
                summary.get("repeats"), synthetic_dir, fid_report, grids_dir,
            ).to_dict()
        mlflow.log_dict(summary, "train.json")
    return summary


def train_metrics(summary: dict) -> dict[str, float]:
    """What metrics/train.json declares to DVC: the figures compared across experiments, under short flat keys
    rounded to 3 decimals (`dvc exp show` makes one column per key and must fit 120 columns; one test image
    of 120 is 0.008). `acc`/`f1` are
    the real+synthetic model's (real-only's when no synthetic set), `gain`/`gain_sd` its macro-F1 gain over
    real-only (mean, sample std over `classifier.repeats` seeds). Per class, ids and hashes: the report."""
    from .provenance import gain_stats

    augmented = summary.get("real_plus_synthetic") or {}
    model = summary["real_only"] if augmented.get("skipped") or not augmented else augmented
    out = {"acc": model["accuracy"], "f1": model["macro_f1"]}
    stats = gain_stats(summary.get("gain"), summary.get("repeats"))
    if stats:
        out["gain"] = stats["mean"]
        if stats["std"] is not None:
            out["gain_sd"] = stats["std"]
    return {k: round(float(v), 3) for k, v in out.items()}


def champion_param(summary: dict) -> dict[str, str]:
    """reports/train/champion.json: the registry's champion after this training, which the export stage reads
    as a DVC *param*: export re-runs when the champion changes, and `dvc exp show` shows a short version
    number instead of the 32-character md5 column a file dependency on train's outputs would add."""
    registered = summary.get("registered") or {}
    champion = registered.get("version") if registered.get("alias") == "champion" else registered.get("champion_before")
    return {"champion": str(champion or "none")}


def _synthetic_hash(synthetic_dir: Path) -> str:
    return sha256_tree(synthetic_dir) if synthetic_dir.exists() else "none"


@click.command("train")
@params_option
@click.option("--processed", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--synthetic", default="data/synthetic", show_default=True, type=click.Path(file_okay=False))
@click.option("--fid", "fid_file", default="metrics/fid.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--fid-report", default="reports/evaluate/fid_per_class.json", show_default=True,
              type=click.Path(dir_okay=False), help="Per-class FID/KID for the model card.")
@click.option("--grids", "grids_dir", default="reports/grids", show_default=True, type=click.Path(file_okay=False),
              help="Real-vs-synthetic grids (<class>.png) for the model card.")
@click.option("--metrics", "metrics_file", default="metrics/train.json", show_default=True,
              type=click.Path(dir_okay=False), help="The few figures DVC compares (see train_metrics).")
@click.option("--reports", default="reports/train", show_default=True, type=click.Path(file_okay=False),
              help="Histories, confusion matrices and summary.json (the full train report).")
@click.option("--weights", "weights_dir", default="models/classifier", show_default=True,
              type=click.Path(file_okay=False), help="Where each variant's trained weights are written.")
@click.option("--register/--no-register", default=True, show_default=True,
              help="Register the better variant in the MLflow model registry.")
def train_command(params_path: str, processed: str, synthetic: str, fid_file: str, fid_report: str, grids_dir: str,
                  metrics_file: str, reports: str, weights_dir: str, register: bool) -> None:
    """Train the real-only baseline and the real+synthetic classifier; compare them on the real test set."""

    params = load_or_exit(params_path)
    try:
        summary = run_training(params, Path(processed), Path(synthetic), Path(reports), Path(fid_file), register,
                               Path(weights_dir), Path(fid_report), Path(grids_dir))
    except PretrainedWeightsError as err:
        raise click.ClickException(str(err)) from None
    write_json(Path(reports) / SUMMARY_FILE, summary)
    write_json(Path(reports) / CHAMPION_FILE, champion_param(summary))
    write_json(metrics_file, train_metrics(summary))
    metric = params.classifier.primary_metric
    line = f"train: real_only test {metric}={summary['real_only'][metric]:.4f}"
    if summary["gain"] is not None:
        line += (f", real_plus_synthetic {summary['real_plus_synthetic'][metric]:.4f} "
                 f"(gain {summary['gain'][metric]:+.4f})")
    if "repeats" in summary:
        rep = summary["repeats"]
        line += (f"; over {len(rep['seeds'])} seeds gain {rep[f'gain_{metric}_mean']:+.4f} "
                 f"+/- {rep[f'gain_{metric}_std']:.4f}")
    click.echo(line + f" -> {metrics_file}, {Path(reports) / SUMMARY_FILE}")
    if "registered" in summary:
        reg = summary["registered"]
        click.echo(f"registry: {reg['model_name']} v{reg['version']} ({reg['variant']}) -> @{reg['alias']}: "
                   f"{reg['reason']}")
