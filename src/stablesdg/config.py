"""Typed configuration: `params.yaml` parsed into dataclasses, validated with messages that name the key.

Every section of params.yaml has one dataclass here. A field's `metadata` may carry
`choices` (allowed values) or `range` (inclusive numeric bounds, None for open); the loader
checks types from the annotations, rejects unknown keys and reports `section.key` and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import StableSDGError
from .schedulers import SCHEDULERS

NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
# Class names become folder and file names (images/<class>/, models/adapters/<class>/, DVC foreach keys):
# one safe pattern, so `..`, `-x`, `a:b`, tabs and newlines cannot get near a path.
CLASS_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
# torchvision's, and timm's EfficientNet-Lite0 with the ImageNet weights a registry package ships (imagenet.py)
BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
             "regnet_x_400mf", "shufflenet_v2_x1_0", "efficientnet_lite0")


class ConfigError(StableSDGError, ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def choice(*values: Any, default: Any) -> Any:
    return field(default=default, metadata={"choices": values})


def bounded(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"range": (lo, hi)})


def _list(default: list, lo: float | None = None, hi: float | None = None) -> Any:
    meta = {"range": (lo, hi)} if lo is not None or hi is not None else {}
    return field(default_factory=lambda: list(default), metadata=meta)


# --------------------------------------------------------------------------------------- sections
@dataclass
class DemoConfig:
    per_class: int = bounded(40, 5, 10_000)
    size: int = bounded(200, 32, 1024)


@dataclass
class DataConfig:
    # `data/demo` is what the `demo` stage writes; point this at your own (dvc add-ed) folder instead.
    source: str = "data/demo"
    layout: str = choice("auto", "neu-cls", "neu-det", "folders", default="auto")
    image_size: int = bounded(200, 32, 2048)
    color_mode: str = choice("L", "RGB", default="L")
    k_shot: int = bounded(10, 1, 10_000)
    val_per_class: int = bounded(10, 1, 10_000)
    test_per_class: int = bounded(20, 1, 100_000)
    max_pixels: int = bounded(40_000_000, 1024, None)
    max_file_mb: float = bounded(64.0, 0.001, None)
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class ClassConfig:
    """Per-class settings (params key `classes.<name>`): DVC re-runs only the class whose block changes."""

    initializer: str = "texture"
    embedding_steps: int | None = bounded(None, 0, 1_000_000)
    lora_steps: int | None = bounded(None, 0, 1_000_000)


@dataclass
class ModelConfig:
    # `tiny`: built-in SD-architecture model; else a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)
    # or a local diffusers folder.
    base: str = "embedded"
    revision: str | None = None
    resolution: int = bounded(128, 32, 1024)
    placeholder: str = "<{cls}>"
    tiny_seed: int = bounded(0, 0, None)


@dataclass
class EmbeddingStageConfig:
    steps: int = bounded(60, 0, 1_000_000)
    learning_rate: float = bounded(5e-3, 0.0, 10.0)
    batch_size: int = bounded(4, 1, 1024)


@dataclass
class LoraStageConfig:
    steps: int = bounded(60, 0, 1_000_000)
    rank: int = bounded(4, 1, 1024)
    alpha: float = bounded(4.0, 0.0, 4096.0)
    unet_learning_rate: float = bounded(1e-3, 0.0, 10.0)
    text_learning_rate: float = bounded(5e-4, 0.0, 10.0)
    batch_size: int = bounded(4, 1, 1024)
    train_text_encoder: bool = True
    # What stage 2 trains in the U-Net: LoRA layers, or every weight (DreamBooth-style; unet_learning_rate then
    # applies to all of them, so lower it, e.g. 1e-4). The text encoder keeps LoRA either way.
    unet: str = choice("lora", "full", default="lora")


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True


@dataclass
class AdaptConfig:
    embedding: EmbeddingStageConfig = field(default_factory=EmbeddingStageConfig)
    lora: LoraStageConfig = field(default_factory=LoraStageConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt_templates: list[str] = _list(["A photo of {}", "A close-up photo of {}", "A grayscale photo of {}"])
    checkpoint_every: int = bounded(20, 1, 1_000_000)
    grid_every: int = bounded(0, 0, 1_000_000)
    sample_images: int = bounded(4, 0, 64)  # real-vs-generated grid after training (MLflow); 0: none
    mixed_precision: str = choice("auto", "no", "fp16", "bf16", default="auto")
    gradient_checkpointing: bool = True
    device: str = "auto"
    # Training resolution; null = model.resolution. Set it to generate.resolution so that the LoRA learns the
    # class's fine structure (cracks, grain) at the scale it is rendered at, not blurred by a downscale.
    resolution: int | None = bounded(None, 32, 2048)


@dataclass
class GenerateConfig:
    mode: str = choice("img2img", "txt2img", default="img2img")
    per_class: int = bounded(40, 0, 1_000_000)
    strength: float = bounded(0.5, 0.0, 1.0)
    # DA-Fusion's variants (Trabucco et al. 2024): when set, image i of a class is made at strengths[j], j the
    # round over the train images that i falls in, so every real image gets variants at every strength (1.0 =
    # from pure noise). Empty: every image at the searched (or `strength`) value.
    strengths: list[float] = _list([], 0.0, 1.0)
    guidance_scale: float = bounded(5.0, 0.0, 50.0)
    steps: int = bounded(20, 1, 1000)
    scheduler: str = choice(*SCHEDULERS, default="ddim")
    use_search: bool = True
    batch_size: int = bounded(8, 1, 1024)
    device: str = "auto"
    # Weights and activations while generating (search trials too): auto = fp16 on CUDA, fp32 elsewhere.
    precision: str = choice("auto", "fp32", "fp16", "bf16", default="auto")
    # Denoising resolution; null = model.resolution. The U-Net and VAE are convolutional, so a small prior can
    # render at the classifier's scale and keep structures that a smaller render would erase.
    resolution: int | None = bounded(None, 32, 2048)


@dataclass
class SearchConfig:
    strength: list[float] = _list([0.3, 0.5, 0.7], 0.0, 1.0)
    guidance_scale: list[float] = _list([3.0, 7.5], 0.0, 50.0)
    steps: list[int] = _list([10], 1, 1000)
    scheduler: list[str] = field(default_factory=lambda: ["ddim"], metadata={"choices": tuple(SCHEDULERS)})
    images_per_trial: int = bounded(8, 2, 10_000)
    refine: bool = True
    refine_rounds: int = bounded(1, 0, 10)
    # A trial whose images sit closer to their nearest train image than this fraction of the held-out real
    # images' distance is a near-copy of the k train images and cannot win (1.0 = as novel as a new real image).
    min_novelty: float = bounded(0.5, 0.0, 10.0)
    # A trial whose images keep less fine detail than this fraction of the held-out real images' (detail_ratio:
    # 1 = as much, < 1 = blurrier) cannot win either: a blurred copy scores a good FID and loses the thin cracks
    # and small pits that tell the classes apart. 0 switches the rule off.
    min_detail_ratio: float = bounded(0.0, 0.0, 1.0)  # a band around 1: [m, 1/m]
    bootstrap: int = bounded(20, 0, 10_000)  # resamples for each trial's FID noise (0: not measured)


@dataclass
class MetricsConfig:
    feature_net: str = choice("surface", "inception", default="surface")
    inception_weights: str | None = None
    kid_subset_size: int = bounded(50, 2, 100_000)
    kid_subsets: int = bounded(50, 1, 10_000)
    batch_size: int = bounded(32, 1, 4096)
    cache_dir: str = ".cache/features"


@dataclass
class ClassifierConfig:
    backbone: str = choice(*BACKBONES, default="resnet18")
    # false: from scratch; imagenet (or true): ImageNet weights (torchvision's file in the hub cache, or the
    # registry package's for efficientnet_lite0); with weights_path *.safetensors: a `stablesdg pretrain
    # backbone` file (the surface-pretrained body)
    pretrained: bool | str = choice(False, True, "imagenet", default=False)
    weights_path: str | None = None
    input_size: int = bounded(128, 32, 1024)
    epochs: int = bounded(12, 1, 10_000)
    batch_size: int = bounded(32, 1, 4096)
    optimizer: str = choice("adamw", "sgd", default="adamw")
    learning_rate: float = bounded(1e-3, 0.0, 10.0)
    weight_decay: float = bounded(1e-4, 0.0, 1.0)
    schedule: str = choice("cosine", "step", "none", default="cosine")
    patience: int = bounded(8, 1, 10_000)
    synthetic_ratio: float = bounded(1.0, 0.0, 100.0)
    # How the synthetic images enter training. append: real + synthetic_ratio x real synthetic images an epoch.
    # replace (DA-Fusion, Trabucco et al. 2024): an epoch of (1 + synthetic_ratio) x real images in which each
    # real image is swapped, with probability replace_probability, for one of the synthetic variants made from
    # it; equal steps by construction. two_stage: append for the first epochs, then real only (repeated to the
    # same epoch size) for the last finetune_fraction of the epochs.
    synthetic_use: str = choice("append", "replace", "two_stage", default="replace")
    replace_probability: float = bounded(0.5, 0.0, 1.0)
    finetune_fraction: float = bounded(0.25, 0.0, 1.0)
    # How long the real-only baseline trains. "equal": its real images repeated to the size of real + synthetic,
    # so both variants take the same optimizer steps (60 real images are 2 steps an epoch, + 300 synthetic 12:
    # without it part of the "gain" is extra training). "epochs": the same epochs, fewer steps (the old baseline).
    baseline_steps: str = choice("equal", "epochs", default="equal")
    # Training seeds per variant for the gain estimate (mean and spread): a 60-image training set swings by
    # several points from seed to seed. The first seed's models are the ones logged and registered.
    repeats: int = bounded(3, 1, 100)
    label_smoothing: float = bounded(0.1, 0.0, 0.9)
    augment: bool = True
    primary_metric: str = choice("macro_f1", "accuracy", default="macro_f1")
    num_workers: int = bounded(0, 0, 64)
    device: str = "auto"


@dataclass
class ExportConfig:
    opset: int = bounded(17, 11, 23)
    quantize: bool = True
    max_accuracy_drop: float = bounded(0.5, 0.0, 100.0)
    calibration_images: int = bounded(60, 1, 100_000)
    # int8 calibration (issue 15, stablesdg.quantize; benchmarks/bench_line_model.py compares them on NEU-CLS):
    calibration_sources: str = choice("train", "train+synthetic", default="train")  # + data/synthetic images
    calibration_sampling: str = choice("random", "stratified", default="random")  # stratified: equal per class
    calibration_method: str = choice("minmax", "entropy", "percentile", default="minmax")
    calibration_percentile: float = bounded(99.999, 50.0, 100.0)  # calibration_method: percentile
    calibration_per_channel: bool = True  # per-channel weight scales (false: one scale per tensor)
    fp32_nodes: list[str] = _list(["first_conv", "last_gemm"])  # left in fp32 (or node names); [] = all int8
    parity_atol: float = bounded(1e-4, 0.0, 1.0)
    parity_rtol: float = bounded(1e-5, 0.0, 1.0)


@dataclass
class TrackingConfig:
    experiment: str = "stablesdg"
    registered_model: str = "steel-defect-classifier"


@dataclass
class Params:
    seed: int = bounded(42, 0, 2**32 - 1)
    # torch's CPU thread count in every stage: CPU float sums depend on it (1 and 2 threads differ by 1e-8 from
    # the first step), so a fixed count gives the same bytes on every machine; None: torch's default (all cores)
    threads: int | None = bounded(2, 1, 1024)
    data: DataConfig = field(default_factory=DataConfig)
    classes: dict[str, ClassConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes) if self.classes else list(NEU_CLASSES)

    def class_config(self, name: str) -> ClassConfig:
        if name not in self.class_names:
            raise ConfigError(f"classes: unknown class {name!r}; allowed: {', '.join(self.class_names)}")
        return self.classes.get(name, ClassConfig())


# --------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v if v is not None else {}, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML .nan / .inf: NaN would switch every range check off
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _check_bounds(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None:
        return
    for v in value if isinstance(value, list) and "choices" in meta else [value]:
        if "choices" in meta and v not in meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
            raise ConfigError(f"{key}: {v!r} is not allowed; allowed values: {allowed}")
    if "range" in meta:
        lo, hi = meta["range"]
        for v in value if isinstance(value, list) else [value]:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                raise ConfigError(f"{key}: {v!r} is out of range; allowed values: {span}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
        _check_bounds(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def parse_params(raw: dict | None) -> Params:
    params = _build(Params, raw or {}, "")
    _check_classes(params)
    return params


def _check_classes(params: Params) -> None:
    for name in params.classes:
        if not CLASS_NAME_PATTERN.fullmatch(name) or len(name) > 64:
            raise ConfigError(f"classes.{name!r}: class names must match {CLASS_NAME_PATTERN.pattern} "
                              "(lower-case letters, digits, '_' and '-', starting with a letter or digit; "
                              "at most 64 characters)")
    if len(params.class_names) < 2:
        raise ConfigError("classes: at least two classes are needed to train a classifier")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return parse_params(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params as flat `a.b.c` keys (MLflow params)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out
