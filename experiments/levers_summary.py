"""Issue 22's lever table from the committed reports: generation (FID / detail_ratio per class) and recognition
(macro-F1 gain at equal steps, paired by seed), written to reports/neu/k10/levers/README.md.

    python experiments/levers_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

K10 = Path(__file__).resolve().parents[1] / "reports" / "neu" / "k10"
OUT = K10 / "levers"


def generation_rows() -> list[str]:
    """The pipeline's set before (128 px, detail from mixing.json) and after (200 px), against the test images."""
    before = json.loads((K10 / "fid_per_class.json").read_text())["per_class"]
    before_detail = json.loads((K10 / "mixing.json").read_text())["detail_ratio"]["searched"]
    after = json.loads((OUT / "r200_fid_per_class.json").read_text())["per_class"]
    classes = list(after)
    lines = ["| synthetic set (60 per class, vs the 100 real test images per class) | "
             + " | ".join(classes) + " | mean |", "|---|" + "---:|" * (len(classes) + 1)]
    for name, per, detail in (("128 px, DDIM 10 (before)", before, before_detail),
                              ("200 px, DDIM 10 (adopted)", after, {c: after[c]["detail_ratio"] for c in classes})):
        cells = [f"{per[c]['fid_surface']:.1f} / {detail[c]:.2f}" for c in classes]
        mean = f"{np.mean([per[c]['fid_surface'] for c in classes]):.1f} / {np.mean([detail[c] for c in classes]):.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def recognition_rows(folder: Path, label: str) -> list[str]:
    rows = json.loads((folder / "mixing.json").read_text())["rows"]
    score = {(r["arm"], r["seed"]): r["macro_f1"] for r in rows}
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        seeds = sorted(s for a, s in score if a == arm)
        f1 = [score[(arm, s)] for s in seeds]
        base = "eq360"
        gains = [score[(arm, s)] - score[(base, s)] for s in seeds if (base, s) in score and arm != base]
        if arm == base:
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
             "", "## Recognition at equal optimizer steps (360 images an epoch, 12 epochs; 600 real test images)", "",
             "| backbone | arm | seeds | macro-F1 | gain over real only (eq360), paired by seed |",
             "|---|---|---:|---:|---:|"]
    for sub, label in (("resnet18", "resnet18, from scratch"), ("effnet", "efficientnet_lite0, ImageNet")):
        if (OUT / sub / "mixing.json").exists():
            lines += recognition_rows(OUT / sub, label)
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print((OUT / "README.md").read_text())


if __name__ == "__main__":
    main()
