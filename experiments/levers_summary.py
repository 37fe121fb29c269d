"""Issue 22's lever table from the committed reports: generation (FID / detail_ratio per class), the per-lever
renders on the hardest classes (samplers, steps, strength, adaptation capacity), recognition (macro-F1 gain at
equal steps, paired by seed) and the real-data reference (k = 30 real images at the same steps), written to
reports/neu/k10/levers/README.md.

    python experiments/levers_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

K10 = Path(__file__).resolve().parents[1] / "reports" / "neu" / "k10"
OUT = K10 / "levers"
# capacity/<name>.json: the re-adapted generators (capacity/<name>.params.yaml; the pipeline's: LoRA rank 4,
# 60 + 60 steps at 128 px)
CAPACITY = {"r16": "LoRA rank 16", "r64": "LoRA rank 64", "r4_200": "LoRA rank 4 trained at 200 px",
            "full": "full U-Net fine-tuning (60 + 200 steps, lr 1e-4)"}


# Whole synthetic sets at 200 px scored by `stablesdg evaluate` (OUT/<file>), after the 128 px one
SETS_200 = {"r200_fid_per_class.json": "200 px, DDIM 10, search grid 0.4/0.55/0.7 (set r200 of the recognition rows)",
            "r200g4_fid_per_class.json": "200 px, DDIM 10, search grid 0.4-0.85 (experiments/neu.params now)",
            "strengthset_fid_per_class.json": "200 px, each image's strength drawn from 0.4/0.55/0.7/0.85 (DA-Fusion)",
            "a200_fid_per_class.json": "200 px, search grid 0.4-0.85, LoRA adapted at 200 px (adapt.resolution: 200)"}


def generation_rows() -> list[str]:
    """The pipeline's set before (128 px, detail from mixing.json) and after (200 px), against the test images."""
    before = json.loads((K10 / "fid_per_class.json").read_text())["per_class"]
    before_detail = json.loads((K10 / "mixing.json").read_text())["detail_ratio"]["searched"]
    sets = [("128 px, DDIM 10 (before)", before, before_detail)]
    for file, name in SETS_200.items():
        if (OUT / file).exists():
            per = json.loads((OUT / file).read_text())["per_class"]
            sets.append((name, per, {c: v["detail_ratio"] for c, v in per.items()}))
    classes = list(sets[-1][1])
    lines = ["| synthetic set (60 per class, vs the 100 real test images per class) | "
             + " | ".join(classes) + " | mean |", "|---|" + "---:|" * (len(classes) + 1)]
    for name, per, detail in sets:
        cells = [f"{per[c]['fid_surface']:.1f} / {detail[c]:.2f}" for c in classes]
        mean = f"{np.mean([per[c]['fid_surface'] for c in classes]):.1f} / {np.mean([detail[c] for c in classes]):.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def lever_rows() -> list[str]:
    """Every lever rendered on the same sources and seeds, scored against the held-out real images (val + pool:
    the search's reference) - generation_levers.json, and capacity/<name>.json for re-adapted generators."""
    results = json.loads((OUT / "generation_levers.json").read_text())["results"]
    for path in sorted((OUT / "capacity").glob("*.json")):
        for key, value in json.loads(path.read_text())["results"].items():
            cls, lever = key.split("|")
            results[f"{cls}|{CAPACITY.get(path.stem, path.stem)}, {lever}"] = value
    classes = sorted({k.split("|")[0] for k in results})
    levers = list(dict.fromkeys(k.split("|")[1] for k, v in results.items() if "/200" in k and "novelty" in v))
    lines = ["| lever (sampler:steps@strength/render px) | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    for lever in levers:
        cells = [results.get(f"{c}|{lever}") for c in classes]
        lines.append(f"| {lever} | " + " | ".join(
            "—" if r is None else f"{r['fid_surface']:.1f} / {r['detail_ratio']:.2f} / {r.get('novelty', float('nan')):.2f}"
            for r in cells) + " |")
    return lines


def recognition_rows(folder: Path, label: str, baseline: Path | None = None,
                     skip_arms: tuple[str, ...] = ()) -> list[str]:
    """One row per arm but `skip_arms`; `baseline`: another folder whose eq360 rows the gains pair with (k = 30
    against k = 10)."""
    rows = json.loads((folder / "mixing.json").read_text())["rows"]
    score = {(r["arm"], r["seed"]): r["macro_f1"] for r in rows}
    base_score = score if baseline is None else \
        {(r["arm"], r["seed"]): r["macro_f1"] for r in json.loads((baseline / "mixing.json").read_text())["rows"]}
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] not in skip_arms):
        seeds = sorted(s for a, s in score if a == arm)
        f1 = [score[(arm, s)] for s in seeds]
        base = "eq360"
        gains = [score[(arm, s)] - base_score[(base, s)] for s in seeds
                 if (base, s) in base_score and (arm != base or baseline is not None)]
        if arm == base and baseline is None:
            gain = "baseline"
        elif len(gains) > 1:  # σ = the gains' standard deviation over seeds (the convention of reports/neu)
            gain = (f"{np.mean(gains) * 100:+.1f} ± {np.std(gains, ddof=1) * 100:.1f} pt "
                    f"({np.mean(gains) / np.std(gains, ddof=1):+.1f} σ, n={len(gains)})")
        else:
            gain = f"{np.mean(gains) * 100:+.1f} pt (n=1)"
        spread = f" ± {np.std(f1, ddof=1):.3f}" if len(f1) > 1 else ""
        out.append(f"| {label} | {arm} | {len(seeds)} | {np.mean(f1):.3f}{spread} | {gain} |")
    return out


def main() -> None:
    lines = ["# Issue 22 levers on NEU-CLS k = 10", "",
             "## Generation (FID_surface / detail_ratio; 1 = as much fine detail as real)", "", *generation_rows(),
             "", "## Levers on the hardest classes (24 images each; FID_surface / detail_ratio / novelty, "
             "against the held-out real images; novelty 1 = as far from the k train images as a held-out real "
             "image)", "", *lever_rows(),
             "", "## Recognition at equal optimizer steps (360 images an epoch, 12 epochs; 600 real test images)", "",
             "| backbone | arm | seeds | macro-F1 | gain over real only (eq360), paired by seed |",
             "|---|---|---:|---:|---:|"]
    for sub, label in (("resnet18", "resnet18, from scratch"), ("effnet", "efficientnet_lite0, ImageNet")):
        if (OUT / sub / "mixing.json").exists():
            lines += recognition_rows(OUT / sub, label)
        if (OUT / f"{sub}_a200" / "mixing.json").exists():  # the set adapted at 200 px; its eq360 rows are sub's
            lines += recognition_rows(OUT / f"{sub}_a200", label, skip_arms=("eq360",))
        if (OUT / f"{sub}_k30" / "mixing.json").exists():  # the same test images, 20 more REAL train images a class
            lines += recognition_rows(OUT / f"{sub}_k30", f"{label}, k = 30 real (reference)", OUT / sub)
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print((OUT / "README.md").read_text())


if __name__ == "__main__":
    main()
