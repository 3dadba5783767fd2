#!/usr/bin/env bash
# The benchmarks on one GPU, in one capped command: phase-1/phase-2 step
# tokens/s against the PyTorch reference on the same GPU (fp32 and bf16),
# MFU against the datasheet peak of the detected device, and inference.
#
#   benchmarks/gpu.sh                 # on the GPU machine, from the repo root
#   benchmarks/gpu.sh --dry-run       # on CPU: tiny shapes, proves it runs
#   CAP_S=540 OUT=/tmp/gpu benchmarks/gpu.sh
#
# Needs a Python with jax[cuda] and a CUDA torch (PYTHON=..., default
# python3), transformers 4.57.6 and this repo's requirements. Everything it
# prints is also written to $OUT (default ./gpu_results), one JSON line per
# measurement plus each script's table; every script runs under `timeout`
# and the whole run under CAP_S seconds.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
CAP_S=${CAP_S:-540}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the GPU: no JAX preallocation of 75% of memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
START=$(date +%s)

left() { echo $(( CAP_S - ($(date +%s) - START) )); }

run() {  # run NAME CMD...: under the time left, output to $OUT/NAME.txt
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -le 10 ]; then echo "skip $name: time cap reached"; return; fi
  echo "== $name (cap ${t}s): $*"
  timeout "$t" "$@" 2>&1 | grep -v -i warning | tee "$OUT/$name.txt"
}

if [ $DRY = 1 ]; then
  KIND=cpu-dry-run
  PEAK_FP32=0; PEAK_BF16=0   # 0: the scripts measure a matmul peak
  SHAPES=(--batch 2 --seq 32 --rounds 1 --vocab 2000 --mix released phase2)
  INF=(--batches 2 --seq 32 --rounds 1 --vocab 2000 --full-vocab 4000)
else
  if ! "$PY" -c "import jax, torch, sys; sys.exit(0 if jax.default_backend()=='gpu' and torch.cuda.is_available() else 1)"; then
    echo "no GPU visible to both jax and torch under $PY; use --dry-run on CPU" >&2
    exit 2
  fi
  KIND=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  # Dense datasheet peaks, TFLOP/s: bf16 tensor cores; fp32 without TF32.
  case "$KIND" in
    *H100*|*H200*|*H800*|*GH200*) PEAK_BF16=989; PEAK_FP32=67 ;;
    *A100*) PEAK_BF16=312; PEAK_FP32=19.5 ;;
    *L40S*) PEAK_BF16=362; PEAK_FP32=91.6 ;;
    *L4*) PEAK_BF16=121; PEAK_FP32=30.3 ;;
    *) PEAK_BF16=0; PEAK_FP32=0 ;;   # unknown: measured matmul peak
  esac
  SHAPES=(--batch 32 --seq 128 256 --rounds 5)
  INF=(--batches 1 32 --rounds 10)
fi
echo "device: $KIND  peaks bf16 $PEAK_BF16 fp32 $PEAK_FP32  cap ${CAP_S}s" | tee "$OUT/device.txt"
"$PY" -c "import jax; print(jax.devices())" | tee -a "$OUT/device.txt"

# fp32: JAX's default GPU matmul precision uses TF32 tensor cores; PyTorch
# is given the same (allow_tf32) so both run the same arithmetic. MFU is
# still quoted against the fp32 (non-TF32) peak, as the issue asks.
export TORCH_ALLOW_TF32=1
run step_bf16 "$PY" benchmarks/phase1.py "${SHAPES[@]}" --dtype bfloat16 --peak-tflops "$PEAK_BF16"
run step_fp32 "$PY" benchmarks/phase1.py "${SHAPES[@]}" --dtype float32 --peak-tflops "$PEAK_FP32"
run inference_bf16 "$PY" benchmarks/inference.py "${INF[@]}" --dtype bfloat16
run inference_fp32 "$PY" benchmarks/inference.py "${INF[@]}" --dtype float32
echo "done in $(( $(date +%s) - START ))s; results in $OUT/"
