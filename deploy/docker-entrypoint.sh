#!/bin/sh
# Container entrypoint: refuse to serve an unpinned model or an open API unless explicitly told to.
#   MODEL_SHA256          sha256 of the model file (required)
#   STABLESDG_LINE_TOKEN  bearer token for /model and /classify (required)
#   STABLESDG_LINE_INSECURE=1  opt-out: start without either (local experiments only; logged loudly)
#   MODEL_PATH (default /models/model.onnx), PORT (default 8000); extra arguments go to `stablesdg-line serve`.
set -eu
MODEL_PATH="${MODEL_PATH:-/models/model.onnx}"
missing=""
[ -n "${MODEL_SHA256:-}" ] || missing="MODEL_SHA256"
[ -n "${STABLESDG_LINE_TOKEN:-}" ] || missing="${missing:+$missing and }STABLESDG_LINE_TOKEN"
if [ -n "$missing" ]; then
    if [ "${STABLESDG_LINE_INSECURE:-}" != "1" ]; then
        echo "stablesdg-line: refusing to start: $missing not set. Set MODEL_SHA256 to the released model's" \
             "sha256 and STABLESDG_LINE_TOKEN to a secret, or STABLESDG_LINE_INSECURE=1 to run unpinned" \
             "or open (local experiments only)." >&2
        exit 2
    fi
    echo "stablesdg-line: WARNING: STABLESDG_LINE_INSECURE=1: starting without $missing" >&2
fi
exec stablesdg-line serve "$MODEL_PATH" --host 0.0.0.0 --port "${PORT:-8000}" \
    ${MODEL_SHA256:+--expected-sha256 "$MODEL_SHA256"} "$@"
