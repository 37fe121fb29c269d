#!/usr/bin/env bash
# Issue 15: the line model on NEU-CLS k=10 + synthetic. Trains the candidate backbones (>= 3 seeds), exports
# each to ONNX, then measures on this CPU: int8 calibration variants, accuracy vs latency (plot + Pareto front),
# the conv FLOP limit and the runtime knobs. Needs a NEU k=10 workspace state (data/processed with the k=10
# splits and data/synthetic), e.g. after `bash experiments/neu.sh 10` or `dvc exp apply neu-k10 && dvc checkout`.
#
#   bash experiments/line_models.sh                     # processed/synthetic from the workspace
#   PROCESSED=/tmp/neu/processed SYNTHETIC=/tmp/neu/synthetic SEEDS=42,43,44 EPOCHS=12 bash experiments/line_models.sh
#
# int8 copies as the export stage makes them by default (MinMax per-channel, first conv + last Gemm in fp32).
# Wall time on the 2-core CPU with nothing else running: see benchmarks/results/line_models.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCESSED=${PROCESSED:-data/processed}
SYNTHETIC=${SYNTHETIC:-data/synthetic}
SEEDS=${SEEDS:-42,43,44}
EPOCHS=${EPOCHS:-12}
BACKBONES=${BACKBONES:-resnet18,mobilenet_v3_small,mobilenet_v3_large,efficientnet_b0,shufflenet_v2_x1_0}
MODELS=${MODELS:-/tmp/stablesdg-line-candidates}  # 5-45 MB per model: kept out of the repo
OUT=${OUT:-benchmarks/results}
python benchmarks/train_line_models.py --processed "$PROCESSED" --synthetic "$SYNTHETIC" --out "$MODELS" \
  --backbones "$BACKBONES" --seeds "$SEEDS" --epochs "$EPOCHS"
python benchmarks/bench_line_model.py int8 --model "$MODELS/resnet18_s${SEEDS%%,*}.onnx" --processed "$PROCESSED" \
  --synthetic "$SYNTHETIC" --out "$OUT/int8_neu_resnet18.json"
python benchmarks/bench_line_model.py backbones --models "$MODELS" --processed "$PROCESSED" --synthetic "$SYNTHETIC" \
  --fp32-node first_conv --fp32-node last_gemm --no-also-today \
  --out "$OUT/backbones_neu.json" --plot "$OUT/backbones_neu.png"
python benchmarks/bench_limit.py --models "$MODELS" --seed "${SEEDS%%,*}" --processed "$PROCESSED" --out "$OUT/limit.json"
