#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md in one prepared run of at most 8 minutes:
# first a group of students sharing the teacher's pass, alone / one after another / fused into one
# model (WRN-40-2 -> 15 ResNet-8x4, ResNet-32x4 -> 15 ResNet-8x4, ResNet-32x4 -> 6 MobileNetV2x2,
# with each path's peak memory), and the study's first grid through `python -m tune_kd.run` on
# CIFAR-sized synthetic data for a few epochs (where Ray is installed); then
# ResNet-32x4 -> ResNet-8x4 SimKD epochs on 50,000 CIFAR-sized images along the ladder
# reference -> on-device data -> bf16 + channels_last -> whole step as one CUDA graph (and
# torch.compile's modes for comparison), then the aggregate throughput of 1, 2, 4 and 8 trials
# packed on the GPU, with peak memory per trial.
# Needs only torch and torchvision. Writes gpu.jsonl (one JSON object per measured epoch) and
# log.txt into $OUT (default bench/out), and ends with the summary tables. A step that would not
# finish inside the 8 minutes is skipped and says so.
#
#   bash bench/gpu.sh              # on a machine with a GPU
#   ONLY="fused-wrn fused-r32 fused-mbv2 sweep" bash bench/gpu.sh     # the fused groups alone
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
GROUP_TRAIN=${GROUP_TRAIN:-25600}
SWEEP_EPOCHS=${SWEEP_EPOCHS:-3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JSON="$OUT/gpu.jsonl"
: > "$JSON"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps a carried Ray
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

sweep() {  # the study's first grid through the product, on CIFAR-sized synthetic data
  wanted sweep || return 0
  fits 200 sweep || return 0
  "$PYTHON" -c "import ray" 2>/dev/null || { echo "!! sweep skipped: Ray is not installed"; return 0; }
  echo "== sweep ($SECONDS s)"
  local teacher="$OUT/teachers/resnet38x2_vanilla/ckpt_epoch_240.pth" start=$SECONDS
  "$PYTHON" -c "import sys, torch; from tune_kd import models; from pathlib import Path; \
p = Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); \
torch.save({'model': models.create('resnet38x2', 100).state_dict()}, p)" "$teacher"
  timeout 200 "$PYTHON" -m tune_kd.run --space search_spaces/study_losses.yaml \
    --storage "$OUT/sweep" --name study-losses --set dataset=synthetic \
    --set synthetic_classes=100 --set synthetic_train_size=50000 --set synthetic_test_size=10000 \
    --set epochs="$SWEEP_EPOCHS" --set "lr_decay_epochs=[$SWEEP_EPOCHS]" \
    --set "teacher_checkpoints.resnet38x2=$teacher" > "$OUT/sweep.log" 2>&1 \
    || echo "!! sweep stopped (limit 200 s or error; see $OUT/sweep.log)"
  echo "{\"wall_seconds\": $(( SECONDS - start )), \"epochs\": $SWEEP_EPOCHS}" > "$OUT/sweep.json"
}

GROUP=(--paths ours --precision bf16 --cuda-graphs --train-size "$GROUP_TRAIN" --test-size 1000 --rounds 3)
step fused-wrn 150 --teacher resnet38x2 --group 15 "${GROUP[@]}"
step fused-r32 150 --teacher resnet32x4 --group 15 "${GROUP[@]}"
step fused-mbv2 150 --teacher resnet32x4 --student MobileNetV2_1_0 --group 6 "${GROUP[@]}"
sweep
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
"$PYTHON" bench/gpu_summary.py "$JSON" "$OUT"
