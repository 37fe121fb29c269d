"""The real-vs-synthetic comparison: the real splits every arm shares, the synthetic selection, what each
variant trains on (`classifier.synthetic_use`, `classifier.baseline_steps`), and the paired gain over seeds.
The model, data loading and training loop it runs live in `classifier.py`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .classifier import (
    Evaluation,
    ImageSet,
    TrainResult,
    evaluate,
    load_images,
    make_spec,
    real_split,
    sample_synthetic,
    split_hash,
    train_classifier,
)
from .config import ClassifierConfig, Params
from .data import LINE_SPLIT, DataError, class_names_in
from .preprocess import PreprocessSpec
from .utils import read_json

VARIANTS = ("real_only", "real_plus_synthetic")


GAIN_METRICS = ("accuracy", "macro_f1")


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
    line: ImageSet | None = None  # the imported line images (split `line`, part of `train`); None: none imported


def load_splits(processed_dir: Path, synthetic_dir: Path, params: Params) -> Splits:
    cfg = params.classifier
    class_names = class_names_in(processed_dir)
    if len(class_names) < 2:
        raise DataError(f"{processed_dir}: fewer than two classes; run `stablesdg data ingest` first")
    spec = make_spec(class_names, cfg)
    parts = {s: real_split(processed_dir, class_names, s) for s in ("train", "val", "test")}
    line_paths, line_labels = real_split(processed_dir, class_names, LINE_SPLIT)  # imported line images
    parts["train"] = (parts["train"][0] + line_paths, parts["train"][1] + line_labels)
    if not parts["test"][0] or not parts["val"][0]:
        raise DataError(f"{processed_dir}: the val and test splits must not be empty")
    sets = {s: load_images(p, y, spec, desc=s) for s, (p, y) in parts.items()}
    real_counts = [parts["train"][1].count(i) for i in range(len(class_names))]
    synthetic, reason = None, None
    if cfg.synthetic_ratio <= 0:
        reason = "classifier.synthetic_ratio is 0"
    else:
        # replace draws from every variant of a real image; the ratio sets its epoch size instead
        ratio = math.inf if cfg.synthetic_use == "replace" else cfg.synthetic_ratio
        paths, labels = sample_synthetic(synthetic_dir, class_names, real_counts, ratio, params.seed)
        if paths:
            synthetic = load_images(paths, labels, spec, desc="synthetic")
        else:
            reason = f"no synthetic images in {synthetic_dir}/<class>/ (run the generate stage first)"
    test_hash = split_hash(parts["test"][0], processed_dir)
    train, n_line = sets["train"], len(line_paths)
    line = ImageSet(train.x[-n_line:], train.y[-n_line:], train.paths[-n_line:]) if n_line else None
    return Splits(processed_dir, spec, train, sets["val"], sets["test"], test_hash, synthetic, reason, line)


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
    epoch_size: int  # images an epoch goes through: real (repeated for an equal-steps baseline) + synthetic
    line: LineScore | None = None  # how the trained model does on the imported line images (None: none imported)
    line_plot: Path | None = None  # their per-class plot (viz.line_images_plot), embedded in the model card

    def summary(self, class_names: Sequence[str]) -> dict:
        return {
            **self.evaluation.to_dict(class_names),
            "best_epoch": self.result.best_epoch,
            "epochs_run": len(self.result.history),
            "n_train_real": self.n_train_real,
            "n_train_synthetic": self.n_train_synthetic,
            "epoch_size": self.epoch_size,
            "run_id": self.run_id,
            "test_set_sha256": self.test_hash,
            "line_images": self.line.to_dict() if self.line else None,
        }


@dataclass
class LineScore:
    """A model's predictions on the line images a person labelled (`stablesdg data review-import`), per class.

    They are train-only (split `line`): the model was trained on them, so this says how well it learned the
    cases the line was unsure of, not what it would score on unseen ones (that is the test set's job)."""

    class_names: list[str]
    images: list[int]  # per class
    correct: list[int]

    def accuracy(self) -> list[float | None]:
        """Per class: correct / images (recall on the line images); None where the class has none."""
        return [c / n if n else None for n, c in zip(self.images, self.correct, strict=True)]

    def to_dict(self) -> dict:
        total, correct = sum(self.images), sum(self.correct)
        return {"images": total, "correct": correct, "accuracy": correct / total if total else None,
                "per_class": {cls: {"images": n, "correct": c, "accuracy": a} for cls, n, c, a in
                              zip(self.class_names, self.images, self.correct, self.accuracy(), strict=True)}}


def line_score(model: nn.Module, line: ImageSet, class_names: Sequence[str]) -> LineScore:
    confusion = evaluate(model, line, len(class_names)).confusion  # [true, predicted]
    return LineScore(list(class_names), confusion.sum(axis=1).tolist(), np.diag(confusion).tolist())


def scorer_on_test_set(splits: Splits) -> Callable[[nn.Module, PreprocessSpec, str], float]:
    """(model, the model's spec, metric) -> the metric on `splits`' test set, preprocessed as the model's spec says
    (what the registry re-evaluates a champion with)."""

    def score(model: nn.Module, spec: PreprocessSpec, metric: str) -> float:
        test = splits.test if spec == splits.spec else load_images(splits.test.paths, splits.test.y.tolist(), spec)
        return evaluate(model, test, len(spec.class_names)).metric(metric)

    return score


def variant_synthetic(splits: Splits, variant: str) -> ImageSet | None:
    """The synthetic images a variant trains on (none for the real-only baseline)."""
    return splits.synthetic if variant == "real_plus_synthetic" else None


def repeated(images: ImageSet, size: int) -> ImageSet:
    """`images` repeated in order up to `size` (each copy is augmented afresh in training)."""
    idx = torch.arange(size) % len(images)
    return ImageSet(images.x[idx], images.y[idx], [images.paths[i] for i in idx.tolist()])


def epoch_size(splits: Splits, cfg: ClassifierConfig) -> int:
    """Images an epoch of the real + synthetic variant goes through (and of real only at equal steps)."""
    if splits.synthetic is None:
        return len(splits.train)
    if cfg.synthetic_use == "replace":
        return len(splits.train) + round(cfg.synthetic_ratio * len(splits.train))
    return len(splits.train) + len(splits.synthetic)


def source_names(synthetic: ImageSet) -> list[str]:
    """The real train image each synthetic image was made from (its class folder's manifest.json)."""
    manifests: dict[Path, dict[str, str]] = {}
    out = []
    for path in synthetic.paths:
        folder = Path(path).parent
        if folder not in manifests:
            if not (folder / "manifest.json").exists():  # a hand-made set: nothing says which real image it varies
                raise DataError(f"{folder / 'manifest.json'} not found: classifier.synthetic_use: replace swaps each "
                                "real image for its own variants, which `stablesdg generate` lists there; "
                                "regenerate the set or set classifier.synthetic_use: append")
            records = read_json(folder / "manifest.json")["images"]
            manifests[folder] = {r["file"]: r["source"] for r in records}
        out.append(manifests[folder][Path(path).name])
    return out


def replacing(real: ImageSet, size: int, synthetic: ImageSet, probability: float) -> ImageSet:
    """DA-Fusion's use: `real` repeated to `size`; each epoch swaps each image, with `probability`, for one of
    the synthetic variants made from that real image (a real image without variants stays itself)."""
    base = repeated(real, size)
    by_source: dict[str, list[int]] = {}
    for i, name in enumerate(source_names(synthetic)):
        by_source.setdefault(name, []).append(i)
    variants = [torch.tensor(by_source.get(Path(p).name, []), dtype=torch.long) for p in base.paths]

    def draw(epoch: int, gen: torch.Generator) -> ImageSet:
        swap, pick = torch.rand(size, generator=gen), torch.rand(size, generator=gen)
        x, paths = base.x.clone(), list(base.paths)
        for i, options in enumerate(variants):
            if len(options) and swap[i] < probability:
                j = int(options[int(pick[i] * len(options))])
                x[i], paths[i] = synthetic.x[j], synthetic.paths[j]
        return ImageSet(x, base.y, paths)

    return ImageSet(base.x, base.y, base.paths, draw=draw)


def two_stage(real: ImageSet, synthetic: ImageSet, cfg: ClassifierConfig) -> ImageSet:
    """Real + synthetic for the first epochs, then real only (repeated to the same epoch size, so the steps
    stay equal) for the last `finetune_fraction` of `epochs`."""
    mixed = combine(real, synthetic)
    tail, switch = repeated(real, len(mixed)), cfg.epochs - round(cfg.finetune_fraction * cfg.epochs)
    return ImageSet(mixed.x, mixed.y, mixed.paths, draw=lambda epoch, gen: mixed if epoch <= switch else tail)


def variant_train_set(splits: Splits, variant: str, cfg: ClassifierConfig) -> ImageSet:
    """What a variant trains on: real + synthetic as `classifier.synthetic_use` says, or the real images
    (repeated to as many optimizer steps when `classifier.baseline_steps` is "equal")."""
    synthetic = variant_synthetic(splits, variant)
    if synthetic is not None:
        if cfg.synthetic_use == "replace":
            return replacing(splits.train, epoch_size(splits, cfg), synthetic, cfg.replace_probability)
        if cfg.synthetic_use == "two_stage":
            return two_stage(splits.train, synthetic, cfg)
        return combine(splits.train, synthetic)
    if cfg.baseline_steps == "equal" and splits.synthetic is not None:
        return repeated(splits.train, epoch_size(splits, cfg))
    return splits.train


# --------------------------------------------------------------------------------------- arms x seeds
# An arm: what it trains on, from the shared splits and the classifier config.
TrainSet = Callable[[Splits, ClassifierConfig], ImageSet]


def variant_arm(variant: str) -> TrainSet:
    """The train stage's variant as an arm."""
    return lambda splits, cfg: variant_train_set(splits, variant, cfg)


def train_and_score(splits: Splits, train: ImageSet, cfg: ClassifierConfig, seed: int,
                    desc: str) -> tuple[TrainResult, Evaluation]:
    """One classifier trained on `train` (early stopping on the shared val split), scored on the test split."""
    result = train_classifier(train, splits.val, splits.spec, cfg, seed, desc=desc)
    return result, evaluate(result.model, splits.test, len(splits.spec.class_names))


def run_arms(splits: Splits, cfg: ClassifierConfig, arms: dict[str, TrainSet], seeds: Sequence[int],
             done: dict[tuple[str, int], Evaluation] | None = None) -> dict[str, list[Evaluation]]:
    """Every arm trained at every seed (seed by seed), all scored on the same test set: per arm, the evaluations
    in seed order. `done`: (arm, seed) evaluations already made, not trained again."""
    done = dict(done or {})
    for seed in seeds:
        for arm, train_set in arms.items():
            if (arm, seed) not in done:
                done[(arm, seed)] = train_and_score(splits, train_set(splits, cfg), cfg, seed, f"{arm} seed {seed}")[1]
    return {arm: [done[(arm, seed)] for seed in seeds] for arm in arms}


def seed_stats(values: Sequence[float]) -> dict:
    """Per-seed values (rounded), their mean and sample std (0 for one seed)."""
    arr = np.asarray(values, dtype=float)
    return {"values": [round(v, 6) for v in values], "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def paired_gains(arm: Sequence[Evaluation], baseline: Sequence[Evaluation], metric: str) -> list[float]:
    """The arm's metric minus the baseline's, seed by seed."""
    return list(np.subtract([e.metric(metric) for e in arm], [e.metric(metric) for e in baseline]))


# --------------------------------------------------------------------------------------- the table cells
def mean_std_cell(stats: Mapping[str, float]) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def gain_cell(stats: Mapping, suffix: str = "sigma") -> str:
    """A paired gain (`seed_stats`) in points: mean ± sample std, then its signal-to-noise ratio (`sigma`) or the
    seed count (`n`)."""
    if suffix == "n":
        return f"{stats['mean'] * 100:+.1f} ± {stats['std'] * 100:.1f} pt (n={len(stats['values'])})"
    ratio = stats["mean"] / stats["std"] if stats["std"] > 0 else float("inf")
    return f"{stats['mean'] * 100:+.1f} ± {stats['std'] * 100:.1f} pt ({ratio:.1f} σ)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A markdown table: the first `left` columns left-aligned, the others right-aligned."""
    align = "|" + "---|" * left + "---:|" * (len(header) - left)
    return ["| " + " | ".join(header) + " |", align, *("| " + " | ".join(row) + " |" for row in rows)]


def repeated_gain(splits: Splits, cfg: ClassifierConfig, seed: int, first: dict[str, Evaluation]) -> dict:
    """Both variants retrained with `classifier.repeats - 1` more seeds (after `seed`): per-seed test metrics, and
    the gain's mean and sample standard deviation, so a reviewer sees whether the gain is larger than seed noise."""
    seeds = [seed + r for r in range(cfg.repeats)]
    per_seed = run_arms(splits, cfg, {v: variant_arm(v) for v in VARIANTS}, seeds,
                        done={(v, seed): first[v] for v in VARIANTS})
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
