#!/usr/bin/env bash
# The prepared GPU measurement of issue 7: resnet18 pair (257×188 spectrogram + 3 RGB frames of 224×224),
# batch 64, samples/s with and without the fast path (bf16 autocast / fp16 + scaler, channels-last,
# cudnn.benchmark), achieved TFLOP/s against the GPU's bf16 peak; then `pdmp bench` on CUDA.
# Writes $OUT (default runs/gpu-check)/gpu_check.json and bench.json. Usage: scripts/gpu_check.sh [steps]
# CPU smoke run (tiny sizes): DEVICE=cpu SIZE=16 FRAMES=1 BATCH=2 scripts/gpu_check.sh 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu-check}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-224} FRAMES=${FRAMES:-3} BATCH=${BATCH:-64} STEPS=${1:-20}
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
timeout 300 "$PY" -m pdmp_cli bench --gpu-check --encoder resnet18 --device "$DEVICE" --size "$SIZE" --frames "$FRAMES" \
  --batch-size "$BATCH" --steps "$STEPS" --rounds 3 --json "$OUT/gpu_check.json"
# the method ratios and encoder TFLOP/s on the same device (synthetic batches; no dataset needed)
timeout 240 "$PY" -m pdmp_cli bench --device "$DEVICE" --no-pipeline --rounds 3 --steps 10 \
  --json "$OUT/bench.json" || echo "bench (methods/encoders) failed or timed out; gpu_check.json stands"
