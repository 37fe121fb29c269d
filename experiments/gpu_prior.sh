#!/usr/bin/env bash
# Pretrain the embedded prior on a lent GPU machine in one prepared run (device time is scarce): two recipes
# side by side on the one GPU (small models leave it mostly idle), each for a fixed time, weights back in
# 15 MiB parts. Prepare here:
#   python experiments/pack_corpus.py ../shared/datasets/surface-corpus .gpu/corpus --quality 75
#   pip download diffusers, importlib_metadata, regex wheels into .whl/ (the machine has torch and transformers)
# Run there (carry .gpu and .whl): bash experiments/gpu_prior.sh; back here: cat parts | tar x.
# Environment: OUT, VAE_SECONDS, UNET_SECONDS, WORKERS, DEVICE, PY, WHEELS, EXTRA, CORPUS (options for both
# recipes: a CPU rehearsal uses tiny batches).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_prior_out}
VAE_S=${VAE_SECONDS:-150}
UNET_S=${UNET_SECONDS:-250}
WORKERS=${WORKERS:-6}
DEVICE=${DEVICE:-cuda}
STAGE=${STAGE:-/tmp/gpu_prior}
mkdir -p "$OUT" "$STAGE"
WHEELS=${WHEELS:-$(ls .whl/*.whl 2>/dev/null)}
if [ -n "$WHEELS" ]; then
  # shellcheck disable=SC2086
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" $WHEELS \
    || exit 1
  export PYTHONPATH=$STAGE/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PY' || exit 1
import diffusers, torch, transformers
from PIL import features
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "webp", features.check("webp"))
assert features.check("webp"), "Pillow without WebP: cannot read the packed corpus"
PY

pretrain() {  # name, then recipe options
  local name=$1; shift
  $PY -c 'import sys; from stablesdg.commands.prior import prior_group; prior_group(sys.argv[1:])' pretrain \
    --corpus "${CORPUS:-.gpu/corpus}" --out "$STAGE/prior_$name" --device "$DEVICE" --vae-seconds "$VAE_S" \
    --unet-seconds "$UNET_S" --workers "$WORKERS" --latent-views 8 --ema-decay 0.9995 "$@" ${EXTRA:-} \
    > "$OUT/log_$name.txt" 2>&1
  echo "exit $?" >> "$OUT/log_$name.txt"
}
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 > "$OUT/gpu_util.csv" 2>/dev/null &
pretrain base --vae-batch-size 64 --vae-crop 64 --vae-lr 1e-3 --ssim-weight 0.5 --batch-size 256 --unet-lr 5e-4 &
pretrain sharp --vae-batch-size 32 --vae-crop 128 --vae-lr 5e-4 --ssim-weight 1.0 --batch-size 128 --unet-lr 1e-3 &
wait %2 %3
kill %1 2>/dev/null
for name in base sharp; do
  tail -c 600 "$OUT/log_$name.txt"
  [ -f "$STAGE/prior_$name/recipe.json" ] && tar cf - -C "$STAGE" "prior_$name" | split -b 15M - "$OUT/prior_$name.tar.part-"
done
ls -la "$OUT"
