"""Does the FID feature network measure image quality on real steel? Real-vs-real FID and degradation curves.

Two disjoint halves of the real held-out images (val + pool + test, never train) of every class: the FID
between them (small: the same distribution), then the FID with increasing Gaussian noise and blur on the
second half (it must rise monotonically). Writes JSON and prints a table.

    python benchmarks/fid_sanity.py --processed data/processed --out reports/neu/fid_sanity.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from stablesdg.config import parse_params
from stablesdg.data import class_names_in, split_paths
from stablesdg.metrics import load_scorer, sanity_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--per-class", type=int, default=40, help="images per class in each half")
    parser.add_argument("--feature-net", default="surface")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fid_sanity.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:  # the clean halves are featurised once, not once per level
        params = parse_params({"metrics": {"feature_net": args.feature_net, "cache_dir": cache}})
        result = run(load_scorer(params.metrics, params.seed), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def run(scorer, args: argparse.Namespace) -> dict:
    first, second = [], []
    for cls in class_names_in(args.processed):
        held = [p for s in ("val", "pool", "test") for p in split_paths(args.processed, cls, s)][:2 * args.per_class]
        first += held[0::2]
        second += held[1::2]
    return {"processed": str(args.processed), **sanity_curves(scorer, first, second)}


def print_table(result: dict) -> None:
    fid = result["metric"]
    print(f"{fid}: real vs real ({result['n_real']} vs {result['n_other']} images) = {result['real_vs_real']:.3f}")
    print("| degradation | level: FID, ... | monotone |\n|---|---|---|")
    for kind, points in result["curves"].items():
        levels = ", ".join(f"{p['level']}: {p[fid]:.3f}" for p in points)
        print(f"| {kind} ({'sigma' if kind == 'noise' else 'radius'}) | {levels} | {result['monotone'][kind]} |")


if __name__ == "__main__":
    main()
