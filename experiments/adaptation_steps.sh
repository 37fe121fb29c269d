#!/usr/bin/env bash
# Issue 12: does longer generator adaptation make the synthetic set help? Re-adapts every class with more
# textual-inversion / LoRA steps (and optionally another LoRA rank), generates the same number of images with the
# searched per-class settings, measures its FID/KID and detail_ratio against the real test images, then
# scores the new set in the mixing study (real + 300 synthetic against real only
# repeated to the same epoch size, seeds 42-44) next to the pipeline's set.
#
#   bash experiments/adaptation_steps.sh NAME EMBEDDING_STEPS LORA_STEPS [RANK]
#   bash experiments/adaptation_steps.sh lora500 200 500       # -> $WORK/lora500/{adapters,synthetic}
#
# Needs the NEU workspace's images, synthetic set and params (experiments/gpu_recognition.sh pack -> .gpu/rec) and
# its search results (reports/neu/k10/search). THREADS=1 when another job shares the CPU; SEEDS and
# MIXING_OUT (default reports/neu/k10, where the mixing study caches its rows) for a smoke run elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
REC=${REC:-.gpu/rec}
SEARCH=${SEARCH:-reports/neu/k10/search}
WORK=${WORK:-/tmp/adaptation_steps}
name=$1 embedding_steps=$2 lora_steps=$3 rank=${4:-}
dir=$WORK/$name
mkdir -p "$dir"
python - "$REC/params.yaml" "$dir/params.yaml" "$embedding_steps" "$lora_steps" "$rank" "${THREADS:-2}" <<'PY'
import sys
import yaml
src, dst, embedding_steps, lora_steps, rank, threads = sys.argv[1:]
params = yaml.safe_load(open(src))
params["threads"] = int(threads)
params["adapt"]["embedding"]["steps"] = int(embedding_steps)
params["adapt"]["lora"]["steps"] = int(lora_steps)
if rank:
    params["adapt"]["lora"].update(rank=int(rank), alpha=float(rank))
params["adapt"]["checkpoint_every"] = 100
yaml.safe_dump(params, open(dst, "w"), sort_keys=False)
PY
classes=$(python -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["classes"]))' "$dir/params.yaml")
for c in $classes; do
  stablesdg adapt --class "$c" --params "$dir/params.yaml" --processed "$REC/processed" --out "$dir/adapters" \
    --reports "$dir/reports" --checkpoints "$dir/checkpoints" 2>&1 | tr "\r" "\n" | grep "^adapt $c:"
  stablesdg generate --class "$c" --params "$dir/params.yaml" --processed "$REC/processed" \
    --adapters "$dir/adapters" --search "$SEARCH" --out "$dir/synthetic" 2>&1 | tr "\r" "\n" | grep "^generate $c: [0-9]"
done
# FID/KID (the Scorer that search and evaluate use: params' KID settings and seed, cached features) and detail kept,
# against the real test images, next to the pipeline's set, for every class the new set has (the packed workspace
# has no held-out pool, so `stablesdg evaluate` and its novelty score cannot run on it)
python - "$REC" "$dir" <<'PY'
import json, sys
from pathlib import Path
from stablesdg.config import load_params
from stablesdg.data import split_paths, synthetic_paths
from stablesdg.evaluation import detail_ratio
from stablesdg.metrics import load_scorer
rec, new = Path(sys.argv[1]), Path(sys.argv[2])
params = load_params(new / "params.yaml")
scorer = load_scorer(params.metrics, params.seed)
quality = {}
for cls in params.classes:
    if not synthetic_paths(new / "synthetic", cls):
        continue
    test = split_paths(rec / "processed", cls, "test")
    sets = {"pipeline": synthetic_paths(rec / "synthetic", cls), new.name: synthetic_paths(new / "synthetic", cls)}
    quality[cls] = {name: {**{k: round(v, 3) for k, v in scorer.score(test, fake).items()},
                           "detail_ratio": round(detail_ratio(test, fake), 3), "n": len(fake)}
                    for name, fake in sets.items()}
(new / "quality.json").write_text(json.dumps(quality, indent=1))
print(json.dumps(quality, indent=1))
PY
python experiments/synthetic_mixing.py --data "$REC" --threads "${THREADS:-2}" --seeds "${SEEDS:-42,43,44}" \
  --arms eq360,ratio5,"set:$name" --extra "$name=$dir/synthetic" --out "${MIXING_OUT:-reports/neu/k10}"
