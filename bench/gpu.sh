#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md in one prepared run of at most 8 minutes:
# ResNet-32x4 -> ResNet-8x4 SimKD epochs on 50,000 CIFAR-sized images along the ladder
# reference -> on-device data -> bf16 + channels_last -> whole step as one CUDA graph (and
# torch.compile's modes for comparison), then the aggregate throughput of 1, 2, 4 and 8 trials
# packed on the GPU, with peak memory per trial.
# Needs only torch and torchvision. Writes gpu.jsonl (one JSON object per measured epoch) and
# log.txt into $OUT (default bench/out), and ends with the summary tables. A step that would not
# finish inside the 8 minutes is skipped and says so.
#
#   bash bench/gpu.sh              # on a machine with a GPU
#   PYTHON=.venv/bin/python DEVICE=cpu TRAIN=128 TEST=128 PACKED="1 2" PACKED_TRAIN=128 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
DEVICE=${DEVICE:-cuda}
TRAIN=${TRAIN:-49984}  # 781 full batches of 64: the 16-image tail would cost compiled runs a recompile
TEST=${TEST:-10000}
PACKED=${PACKED:-1 2 4 8}
PACKED_TRAIN=${PACKED_TRAIN:-25600}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-470}  # seconds
ONLY=${ONLY:-}  # run only these steps (names as below, space-separated)
mkdir -p "$OUT"
JSON="$OUT/gpu.jsonl"
: > "$JSON"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

fits() {  # would a step of this many seconds end inside the budget?
  if (( SECONDS + $1 > BUDGET )); then echo "!! $2 skipped: not enough of the ${BUDGET}s left"; return 1; fi
}

wanted() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }

step() {  # label, time limit (s), then bench/step.py arguments
  local label=$1 limit=$2
  shift 2
  wanted "$label" || return 0
  fits "$limit" "$label" || return 0
  echo "== $label ($SECONDS s)"
  timeout "$limit" "$PYTHON" bench/step.py --device "$DEVICE" --json "$JSON" --rung "$label" "$@" \
    | grep -v '^{' || echo "!! $label stopped (limit ${limit}s or error)"
}

packed() {  # k trials at once, started together once each has finished its warm-up epoch
  local k=$1 limit=$(( 40 + 4 * $1 ))
  wanted "packed-$k" || return 0
  fits "$limit" "packed x$k" || return 0
  echo "== packed x$k ($SECONDS s)"
  local start=$(( $(date +%s) + 15 + 2 * k )) pids=()
  for _ in $(seq "$k"); do
    timeout "$limit" "$PYTHON" bench/step.py --device "$DEVICE" --json "$JSON" --rung "packed-$k" \
      --paths ours --precision bf16 --cuda-graphs --train-size "$PACKED_TRAIN" --test-size 1000 \
      --epochs 2 --start-at "$start" > /dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"  # (a bare wait would also wait for the log's tee)
}

EPOCH=(--train-size "$TRAIN" --test-size "$TEST")
step device-bf16-cl 60 "${EPOCH[@]}" --paths ours --epochs 2 --precision bf16
step reference 90 "${EPOCH[@]}" --paths reference --epochs 1
step step-graph 60 "${EPOCH[@]}" --paths ours --epochs 2 --precision bf16 --cuda-graphs
step device-fp32 50 "${EPOCH[@]}" --paths ours --epochs 2 --precision fp32 --no-channels-last
step step-graph-fp32 50 "${EPOCH[@]}" --paths ours --epochs 2 --precision fp32 --no-channels-last \
  --cuda-graphs
for k in $PACKED; do packed "$k"; done
step cuda-graphs 170 "${EPOCH[@]}" --paths ours --epochs 2 --precision bf16 --compile reduce-overhead
step compiled 120 "${EPOCH[@]}" --paths ours --epochs 2 --precision bf16 --compile default

echo "== summary ($SECONDS s)"
"$PYTHON" bench/gpu_summary.py "$JSON"
