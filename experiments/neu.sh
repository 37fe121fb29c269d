#!/usr/bin/env bash
# The paper's claims measured on real steel (NEU-CLS): one `dvc exp run` per k, then the recognition table
# (5 seeds, from scratch and from the surface-pretrained backbone), the generation ablation, the VAE
# reconstruction and the FID sanity curves, all written to reports/neu/k<K>/ (committed, shown in the README).
#
#   bash experiments/neu.sh            # k = 10 and k = 30
#   bash experiments/neu.sh 10         # one k
#   NEU=/data/NEU-CLS SEEDS=5 ABLATION_IMAGES=32 bash experiments/neu.sh
#
# The workspace's params.yaml and dvc.lock are restored at the end; `dvc exp show` keeps every run.
set -euo pipefail
cd "$(dirname "$0")/.."
NEU=${NEU:-../shared/datasets/NEU-CLS}
SEEDS=${SEEDS:-5}
ABLATION_IMAGES=${ABLATION_IMAGES:-24}
WEIGHTS=models/pretrained/resnet18_surface.safetensors
if [ ! -d "$NEU" ]; then
  echo "NEU-CLS not found at $NEU: put the 1800 NEU-CLS images there or set NEU=/path/to/NEU-CLS" >&2
  exit 2
fi
overrides=()
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  overrides+=(-S "$line")
done < experiments/neu.params
# Back to the committed default: params, lock, the uncached metrics/reports (reports/neu/ is kept) and, from the
# DVC cache, the default run's data and models.
restore() {
  git checkout -q -- params.yaml dvc.lock metrics reports ":(exclude)reports/neu" && dvc checkout -q >/dev/null 2>&1 || true
}
trap restore EXIT

for k in ${@:-10 30}; do
  out=reports/neu/k$k
  mkdir -p "$out"
  echo "== NEU-CLS k=$k: pipeline" >&2
  dvc exp run -f -n "neu-k$k" "${overrides[@]}" -S "data.source=$NEU" -S "data.k_shot=$k"
  cp metrics/fid.json metrics/train.json metrics/data.json "$out"/
  # the per-class detail is no longer in metrics/ (issue 16): keep the reports next to them
  cp reports/train/summary.json "$out/train_summary.json" && cp reports/data/summary.json "$out/data_summary.json"
  cp reports/evaluate/fid_per_class.json "$out"/
  mkdir -p "$out/search" "$out/grids"
  cp reports/search/*.json "$out/search/" && cp reports/grids/*.png "$out/grids/"
  echo "== NEU-CLS k=$k: recognition ($SEEDS seeds)" >&2
  # (on a lent GPU machine instead: experiments/gpu_recognition.sh pack, then run there; same report files)
  stablesdg recognition --seeds "$SEEDS" --weights "$WEIGHTS" --out "$out"
  echo "== NEU-CLS k=$k: generation ablation ($ABLATION_IMAGES images per class)" >&2
  stablesdg ablation --images "$ABLATION_IMAGES" --out "$out"
  if [ ! -f reports/neu/prior/vae_reconstruction.json ]; then
    echo "== NEU-CLS: VAE reconstruction" >&2
    stablesdg prior reconstruct --images data/processed/images --limit 300 --out reports/neu/prior
  fi
  if [ ! -f reports/neu/fid_sanity.json ]; then
    echo "== NEU-CLS: FID sanity curves" >&2
    python benchmarks/fid_sanity.py --processed data/processed --out reports/neu/fid_sanity.json
  fi
done
