#!/usr/bin/env bash
# The NEU recognition table (the slowest step of experiments/neu.sh: 30 classifier trainings, about 35 min on 2
# CPU cores) on a lent GPU machine, which has torch but no MLflow (hence --no-track).
#   here, in the NEU workspace state (during experiments/neu.sh, or after `dvc exp apply neu-k10`):
#     bash experiments/gpu_recognition.sh pack   # -> .gpu/rec: the train/val/test images, synthetic set, params
#   there (carry .gpu/rec):
#     bash experiments/gpu_recognition.sh run    # -> $OUT/recognition.json + .md
set -euo pipefail
cd "$(dirname "$0")/.."
REC=${REC:-.gpu/rec}
WEIGHTS=models/pretrained/resnet18_surface.safetensors
case "${1:-}" in
pack)
  rm -rf "$REC" && mkdir -p "$REC/processed/splits"
  cp data/processed/splits/*.json "$REC/processed/splits/"
  python - "$REC" <<'PY'
import json, shutil, sys
from pathlib import Path
src, dst = Path("data/processed"), Path(sys.argv[1]) / "processed"
for split_file in sorted((src / "splits").glob("*.json")):
    splits = json.loads(split_file.read_text())
    for rel in splits["train"] + splits["val"] + splits["test"]:  # the pool is not used by the classifier
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
PY
  cp -r data/synthetic "$REC/synthetic"
  cp params.yaml "$REC/params.yaml"
  du -sh "$REC"
  ;;
run)
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
  python3 -c 'import sys; from stablesdg.commands.recognition import recognition_command; recognition_command(sys.argv[1:])' \
    --params "$REC/params.yaml" --processed "$REC/processed" --synthetic "$REC/synthetic" --seeds "${SEEDS:-5}" \
    --weights "$WEIGHTS" --out "${OUT:-reports/recognition}" --no-track
  ;;
*)
  echo "usage: $0 pack|run" >&2
  exit 2
  ;;
esac
