#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one command, on a machine with one NVIDIA GPU (jax with CUDA, torch with
# CUDA and MONAI installed):
#
#   benchmarks/gpu.sh OUT
#
# Writes OUT/gpu.txt (the card), and for each benchmark its table (.log) and JSON: losses (the loss family at
# 4 x 128^3 x 6, float32 and bfloat16 logits, against MONAI DiceCELoss, with the fast path checked against a plain
# formula), train_step (the 3D U-Net step, B = 2, 128^3, against MONAI BasicUNet, fp32 and bf16) and
# sliding_window (whole-volume inference of a 256 x 256 x 160 volume against MONAI's sliding_window_inference).
# Each benchmark has BENCH_TIMEOUT seconds (default 240); a failure is logged and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu.sh OUT}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$(pwd):$(pwd)/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

bench() {
  local name=$1; shift
  echo "== $name"
  timeout "${BENCH_TIMEOUT:-240}" "$PY" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  [ $rc = 0 ] || echo "!! $name exited with status $rc"
}
bench losses benchmarks/losses.py --shapes 4x128x128x128x6 --dtypes float32,bfloat16 --no-compile --iters 20 \
  --out "$OUT/losses.json"
bench train_step benchmarks/train_step.py --batch 2 --size 128 --iters 10 --out "$OUT/train_step.json"
bench sliding_window benchmarks/sliding_window.py --out "$OUT/sliding_window.json"
