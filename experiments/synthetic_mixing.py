"""Issue 12: can the synthetic set help at equal optimizer steps? Ways of mixing it in, scored on NEU-CLS.

Every arm trains resnet18 from scratch with params.yaml's classifier block on the same real k-shot split and is
scored on the same real test images; gains are paired by seed against real only repeated to the arm's size
(`classifier.repeated`: as many optimizer steps, so extra training is not counted as a synthetic gain).

Arms (comma-separated, e.g. `--arms eq360,ratio5,filt0.5`):
  eqN         real only, repeated to N images an epoch
  ratioR      real + R x 10 synthetic images per class (a seeded choice from the set)
  filtP       real + the synthetic images that the seed's eq<real+synthetic> model gives their own class with
              probability >= P (a filter trained on real images only: off-class generations are dropped)
  set:NAME    real + the synthetic set --extra NAME=DIR (e.g. regenerated at another strength), ratio 5
  replaceP    DA-Fusion (`classifier.synthetic_use: replace`): an epoch of real x 6 in which each real image is
              swapped for one of its synthetic variants with probability P (every variant of the set is used)
  twostageF   `classifier.synthetic_use: two_stage`: real + synthetic, then real only (x 6) for the last F of
              the epochs
  ARM@NAME    a replace/twostage arm on the --extra set NAME instead of the searched set

--backbone / --pretrained override params.yaml's classifier (e.g. efficientnet_lite0 + imagenet); --out keeps
each setting's cache apart.

Results are cached per (arm, seed) in OUT/mixing.json, so a rerun adds arms or seeds without retraining.

    python experiments/synthetic_mixing.py --data .gpu/rec --arms eq360,ratio5,filt0.5,eq120,ratio1 --seeds 42,43,44
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from stablesdg.classifier import (
    ImageSet,
    load_images,
    predict_logits,
    synthetic_split,
)
from stablesdg.comparison import (
    combine,
    gain_cell,
    load_splits,
    markdown_table,
    repeated,
    seed_stats,
    train_and_score,
    variant_train_set,
)
from stablesdg.config import load_params
from stablesdg.data import split_paths, synthetic_paths
from stablesdg.metrics import detail_ratio
from stablesdg.utils import sha256_tree


def subset(images: ImageSet, idx) -> ImageSet:
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return ImageSet(images.x[idx], images.y[idx], [images.paths[i] for i in idx.tolist()])


def per_class_choice(images: ImageSet, per_class: int, num_classes: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(images.y.numpy() == c)
        keep += sorted(rng.choice(idx, size=min(len(idx), per_class), replace=False).tolist())
    return subset(images, keep)


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="params.yaml, processed/ and synthetic/ of a NEU run (experiments/gpu_recognition.sh pack)")
@click.option("--arms", required=True)
@click.option("--seeds", default="42,43,44", show_default=True)
@click.option("--extra", multiple=True, help="NAME=DIR: another synthetic set (<class>/*.png) for a set:NAME arm")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/neu/k10"))
@click.option("--threads", default=2, show_default=True)
@click.option("--backbone", default=None, help="classifier.backbone for every arm (default: params.yaml's)")
@click.option("--pretrained", default=None, help="classifier.pretrained: false | imagenet")
def main(data: Path, arms: str, seeds: str, extra: tuple[str, ...], out: Path, threads: int,
         backbone: str | None, pretrained: str | None) -> None:
    torch.set_num_threads(threads)
    params = load_params(data / "params.yaml")
    cfg = dataclasses.replace(params.classifier, backbone=backbone or params.classifier.backbone,
                              pretrained={None: params.classifier.pretrained, "false": False}.get(pretrained,
                                                                                                    pretrained))
    params = dataclasses.replace(params, classifier=cfg)
    splits = load_splits(data / "processed", data / "synthetic", params)
    classes = splits.spec.class_names
    synthetic = splits.synthetic  # None is fine for eqN arms and arms on an --extra set
    extra_sets = dict(item.split("=", 1) for item in extra)
    # each row names the synthetic set it used, so rows added later on a regenerated set are told apart
    set_hash = {name: sha256_tree(root)[:12] for name, root in [("", data / "synthetic"), *extra_sets.items()]
                if Path(root).is_dir()}
    cache_file = out / "mixing.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {"rows": []}
    done = {(r["arm"], r["seed"]): r for r in cache["rows"]}
    models: dict = {}

    def run(train: ImageSet, seed: int, arm: str, arm_cfg=cfg, **info) -> dict:
        start = time.time()
        result, ev = train_and_score(splits, train, arm_cfg, seed, desc=f"{arm} s{seed}")
        models[(arm, seed)] = result.model
        row = {"arm": arm, "seed": seed, "n": len(train), "macro_f1": ev.macro_f1, "accuracy": ev.accuracy,
               "per_class_f1": ev.f1, "best_epoch": result.best_epoch,
               "seconds": round(time.time() - start, 1), **info}
        done[(arm, seed)] = row
        cache["rows"] = list(done.values())
        out.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
        click.echo(f"{arm} seed {seed}: macro-F1 {row['macro_f1']:.4f} ({row['seconds']:.0f} s)", err=True)
        return row

    def baseline(seed: int, n: int):
        arm = f"eq{n}"
        if (arm, seed) not in models:  # the filter needs the model itself, not only its cached score
            run(repeated(splits.train, n), seed, arm)
        return models[(arm, seed)]

    for seed in [int(s) for s in seeds.split(",")]:
        for arm in arms.split(","):
            if (arm, seed) in done:
                continue
            if arm.startswith("eq"):
                baseline(seed, int(arm[2:]))
            elif arm.startswith("ratio"):
                chosen = per_class_choice(synthetic, round(float(arm[5:]) * 10), len(classes), seed)
                run(combine(splits.train, chosen), seed, arm)
            elif arm.startswith("filt"):
                n = len(splits.train) + len(synthetic)
                prob = torch.softmax(torch.as_tensor(predict_logits(baseline(seed, n), synthetic.x)), 1).numpy()
                keep = [i for i in range(len(synthetic)) if prob[i, synthetic.y[i]] >= float(arm[4:])]
                kept = subset(synthetic, keep)
                run(combine(splits.train, kept), seed, arm, kept=len(keep), baseline=f"eq{n}",
                    kept_per_class=[int((kept.y == c).sum()) for c in range(len(classes))])
            elif arm.startswith(("replace", "twostage")):
                name, _, set_name = arm.partition("@")
                pool = (load_images(*synthetic_split(Path(extra_sets[set_name]), classes), splits.spec)
                        if set_name else synthetic)
                prefix = "replace" if name.startswith("replace") else "twostage"
                use, key = {"replace": ("replace", "replace_probability"),
                            "twostage": ("two_stage", "finetune_fraction")}[prefix]
                arm_cfg = dataclasses.replace(cfg, synthetic_use=use, **{key: float(name.removeprefix(prefix))})
                arm_splits = dataclasses.replace(splits, synthetic=pool)
                train = variant_train_set(arm_splits, "real_plus_synthetic", arm_cfg)
                run(train, seed, arm, arm_cfg, n_synthetic_pool=len(pool), baseline=f"eq{len(train)}",
                    set_sha256=set_hash.get(set_name))
            elif arm.startswith("set:"):
                root = Path(extra_sets[arm[4:]])
                all_images = load_images(*synthetic_split(root, classes), splits.spec)
                images = per_class_choice(all_images, 50, len(classes), seed)
                run(combine(splits.train, images), seed, arm, synthetic_dir=str(root), set_sha256=set_hash[arm[4:]])
            else:
                raise click.BadParameter(f"unknown arm {arm!r}", param_hint="--arms")
    # how much fine detail each synthetic set keeps, per class, against the real test images (1 = as much)
    roots = {"searched": data / "synthetic", **{name: Path(d) for name, d in extra_sets.items()}}
    roots = {name: root for name, root in roots.items() if all(synthetic_paths(root, c) for c in classes)}
    cache["detail_ratio"] = {name: {cls: round(detail_ratio(split_paths(data / "processed", cls, "test"),
                                                            synthetic_paths(root, cls)), 3) for cls in classes}
                             for name, root in roots.items()}
    cache.update(classes=classes, device="cpu", n_test=len(splits.test), test_set_sha256=splits.test_hash,
                 backbone=cfg.backbone, init=f"pretrained: {cfg.pretrained}" if cfg.pretrained else "from scratch")
    cache_file.write_text(json.dumps(cache, indent=1))
    (out / "mixing.md").write_text(markdown(cache))
    click.echo((out / "mixing.md").read_text())


def markdown(cache: dict) -> str:
    """Per arm: macro-F1 per seed and mean, and the gain over real only at the same epoch size, paired by seed."""
    rows = cache["rows"]
    score = {(r["arm"], r["seed"]): r for r in rows}
    header = ["arm", "images an epoch", "macro-F1 per seed", "mean", "gain over real only at equal steps"]
    table = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        cells = ", ".join(f"{r['seed']}: {r['macro_f1']:.3f}" for r in mine)
        # a filtered arm has fewer images than the baseline its filter came from: compared with that one
        base = [(r, r.get("baseline", f"eq{r['n']}")) for r in mine if not arm.startswith("eq")]
        gains = [r["macro_f1"] - score[(b, r["seed"])]["macro_f1"] for r, b in base if (b, r["seed"]) in score]
        gain = gain_cell(seed_stats(gains), "n") if len(gains) > 1 else "—"
        n = "/".join(sorted({str(r["n"]) for r in mine}))
        table.append([arm, n, cells, f"{np.mean([r['macro_f1'] for r in mine]):.3f}", gain])
    lines = [f"# Mixing the synthetic set in (NEU-CLS k = 10, {cache.get('backbone', 'resnet18')} "
             f"{cache.get('init', 'from scratch')}, test macro-F1)", "", *markdown_table(header, table)]
    lines[3] = "|---|---:|---|---:|---:|"  # the per-seed cells are text: left-aligned
    if "detail_ratio" in cache:
        lines += ["", "Fine detail kept (`evaluation.detail_ratio` against the real test images; 1 = as much as real, "
                  "< 1 = blurrier):", "",
                  *markdown_table(["synthetic set", *cache["classes"]],
                                  [[name, *(f"{v:.2f}" for v in per.values())]
                                   for name, per in cache["detail_ratio"].items()])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
