"""Ablation: what each part of the method buys, in FID of synthetic images against real held-out images.

Variants per class: no adaptation (the placeholder keeps its initializer-word embedding and LoRA is a no-op),
embedding only, LoRA only, both (the method), and both with pure-noise txt2img instead of image-oriented img2img.
Adapters are retrained in a temporary folder with the adaptation stages restricted, so every variant has the
same step budget. Every variant renders from the same real train images with the same seeds. Works on any
ingested data (it reads the processed folder), and is parameterised to run small on a CPU.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import mlflow
from tqdm import tqdm

from .. import tracking
from ..adaptation import adapt_class
from ..config import Params
from ..data import class_names_in, heldout_paths, split_paths
from ..generation import Settings, chosen_settings, load_adapted_pipeline, render
from ..metrics import Scorer, load_scorer
from ..search import cycled, seeds_for
from ..stages.common import PROCESSED, SEARCH, cli_errors, load_or_exit, params_option, path_option
from ..utils import read_json, write_json


@dataclass(frozen=True)
class Variant:
    id: str
    label: str
    stages: tuple[str, ...] | None  # adaptation stages; None: the real train images themselves
    mode: str = "img2img"


VARIANTS = (
    Variant("none", "no adaptation (initializer word)", ()),
    Variant("embedding", "embedding only", ("embedding",)),
    Variant("lora", "LoRA only", ("lora",)),
    Variant("both", "embedding + LoRA, img2img (method)", ("embedding", "lora")),
    Variant("both_txt2img", "embedding + LoRA, txt2img (pure noise)", ("embedding", "lora"), "txt2img"),
    Variant("real_train", "reference: the k real train images", None),
    Variant("real_heldout", "reference: as many held-out real images (val + pool)", None),
)


def with_adapt_steps(params: Params, steps: int | None) -> Params:
    """Params whose two adaptation stages run `steps` steps each (per-class overrides dropped)."""
    if steps is None:
        return params
    adapt = replace(params.adapt, embedding=replace(params.adapt.embedding, steps=steps),
                    lora=replace(params.adapt.lora, steps=steps))
    classes = {k: replace(v, embedding_steps=None, lora_steps=None) for k, v in params.classes.items()}
    return replace(params, adapt=adapt, classes=classes)


@dataclass
class AblationRun:
    params: Params
    processed: Path
    scorer: Scorer
    images: int
    split: str
    steps: int | None = None  # inference steps override
    search_dir: Path = Path("reports/search")
    adapters: Path = Path("models/adapters")

    def settings(self, cls: str) -> Settings:
        settings, _ = chosen_settings(self.params.generate, self.search_dir / f"{cls}.json")
        return replace(settings, steps=self.steps) if self.steps else settings

    def pipeline_adapters_fit(self, cls: str) -> bool:
        record_file = self.adapters / cls / "adapter.json"
        if not record_file.exists():
            return False
        record, class_cfg, adapt = read_json(record_file), self.params.class_config(cls), self.params.adapt
        expected = {"embedding_steps": class_cfg.embedding_steps if class_cfg.embedding_steps is not None
                    else adapt.embedding.steps,
                    "lora_steps": class_cfg.lora_steps if class_cfg.lora_steps is not None else adapt.lora.steps,
                    "train_images": [p.name for p in split_paths(self.processed, cls, "train")],
                    "base_model": self.params.model.base}
        return all(record.get(k) == v for k, v in expected.items())

    def class_scores(self, cls: str, work: Path) -> dict[str, dict]:
        """Every variant's scores for one class; one adapted pipeline alive at a time (SD 1.5 is 4 GB)."""
        train, real = split_paths(self.processed, cls, "train"), split_paths(self.processed, cls, self.split)
        sources, seeds = cycled(train, self.images), seeds_for(self.params.seed, cls, "ablation", self.images)
        settings = self.settings(cls)
        heldout = heldout_paths(self.processed, cls)[:self.images]
        out: dict[str, dict] = {"real_train": self.scorer.score(real, train),
                                "real_heldout": self.scorer.score(real, heldout)}
        for stages in tqdm(dict.fromkeys(v.stages for v in VARIANTS if v.stages is not None),
                           desc=f"ablation {cls}", unit="adaptation"):
            pipe = self.adapted(cls, stages, work)
            for v in (v for v in VARIANTS if v.stages == stages):
                out[v.id] = self.scorer.score(real, _render(pipe, self.params, cls, sources, settings, seeds, v.mode))
            del pipe
        return out

    def adapted(self, cls: str, stages: tuple[str, ...], work: Path):
        """A fresh adaptation restricted to `stages` (own folder: checkpoints do not record the stages); the
        pipeline's own adapters serve the full method when they were trained with the same steps and images."""
        if stages == ("embedding", "lora") and self.pipeline_adapters_fit(cls):
            return load_adapted_pipeline(self.params.model, cls, self.adapters / cls)
        folder = work / ("-".join(stages) or "none")
        pipe, _ = adapt_class(self.params, cls, self.processed, folder, checkpoint_root=folder / "ckpt",
                              stages=stages)
        pipe.unet.eval()  # LoRA training leaves the modules in train mode
        pipe.text_encoder.eval()
        return pipe


def _render(pipe, params: Params, cls: str, sources: list[Path], settings: Settings, seeds: list[int],
            mode: str) -> list:
    return render(pipe, params, cls, sources, settings.strength, settings.guidance_scale, settings.steps, seeds,
                  mode=mode)


def table(per_class: dict[str, dict[str, dict]], fid_key: str) -> list[dict]:
    """Rows: one per variant, per-class FID and their mean."""
    rows = []
    for v in VARIANTS:
        fids = {cls: scores[v.id][fid_key] for cls, scores in per_class.items()}
        rows.append({"id": v.id, "variant": v.label, **fids, "mean": sum(fids.values()) / len(fids)})
    return rows


def markdown(rows: list[dict], classes: list[str], fid_key: str, note: str) -> str:
    head = f"| variant | {' | '.join(classes)} | mean |\n|---|{'---:|' * (len(classes) + 1)}\n"
    body = "".join(f"| {r['variant']} | {' | '.join(f'{r[c]:.3f}' for c in classes)} | {r['mean']:.3f} |\n"
                   for r in rows)
    return f"# Ablation: {fid_key} (lower is better)\n\n{note}\n\n{head}{body}"


def run_ablation(params: Params, processed: Path, classes: list[str], out_dir: Path, images: int,
                 adapt_steps: int | None = None, steps: int | None = None, split: str = "test",
                 search_dir: Path = Path("reports/search")) -> dict:
    """Score every variant for every class; writes ablation.json and ablation.md into out_dir."""
    params = with_adapt_steps(params, adapt_steps)
    scorer = load_scorer(params.metrics, params.seed)
    run = AblationRun(params, processed, scorer, images, split, steps, search_dir)
    with tempfile.TemporaryDirectory(prefix="stablesdg-ablation-") as tmp:
        per_class = {cls: run.class_scores(cls, Path(tmp) / cls) for cls in classes}
    fid_key = scorer.keys["fid"]
    rows = table(per_class, fid_key)
    result = {
        "feature_net": scorer.extractor.name, "metric": fid_key, "real_split": split, "images_per_class": images,
        "adapt_steps": {"embedding": params.adapt.embedding.steps, "lora": params.adapt.lora.steps},
        "settings": {cls: asdict(run.settings(cls)) for cls in classes},
        "variants": [{"id": v.id, "label": v.label, "stages": v.stages, "mode": v.mode} for v in VARIANTS],
        "per_class": per_class, "rows": rows,
    }
    write_json(out_dir / "ablation.json", result)
    note = (f"{images} synthetic images per class and variant against the real {split} images; "
            f"feature net `{scorer.extractor.name}`.")
    (out_dir / "ablation.md").write_text(markdown(rows, classes, fid_key, note))
    return result


def _classes(params: Params, processed: Path, wanted: str | None) -> list[str]:
    present = set(class_names_in(processed))
    classes = [c for c in params.class_names if c in present]
    if wanted:
        names = [c.strip() for c in wanted.split(",") if c.strip()]
        unknown = [c for c in names if c not in classes]
        if unknown:
            raise click.ClickException(f"--classes: {', '.join(unknown)} not in {processed}; "
                                       f"available: {', '.join(classes)}")
        classes = names
    if not classes:
        raise click.ClickException(f"{processed}: no classes to ablate; run the ingest stage first")
    return classes


@click.command("ablation")
@params_option
@path_option("--processed", default=PROCESSED)
@click.option("--classes", default=None, help="comma-separated classes (default: all)")
@click.option("--images", default=16, show_default=True, type=click.IntRange(2), help="synthetic images per class")
@click.option("--adapt-steps", default=None, type=click.IntRange(0),
              help="steps for each adaptation stage (default: params.yaml adapt.*.steps)")
@click.option("--steps", default=None, type=click.IntRange(1), help="inference steps (default: search best)")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]),
              help="real held-out images to score against")
@path_option("--search", "search_dir", default=SEARCH)
@path_option("--out", default="reports")
@cli_errors
def ablation_command(params_path: str, processed: Path, classes: str | None, images: int, adapt_steps: int | None,
                     steps: int | None, split: str, search_dir: Path, out: Path) -> None:
    """FID of no adaptation / embedding only / LoRA only / both, and txt2img vs img2img, per class."""
    params = load_or_exit(params_path)
    names = _classes(params, processed, classes)
    with tracking.stage_run("ablation", params, inputs=[processed / "splits"]):
        result = run_ablation(params, processed, names, out, images, adapt_steps, steps, split, search_dir)
        mlflow.log_metrics({f"{r['id']}_{k}": v for r in result["rows"] for k, v in r.items()
                            if k not in ("id", "variant")})
        mlflow.log_artifact(str(out / "ablation.json"))
        mlflow.log_artifact(str(out / "ablation.md"))
    click.echo((out / "ablation.md").read_text())
