#!/usr/bin/env bash
# The GPU checks of issues 2-6 in one prepared run (for a lent GPU machine; nothing here is
# needed by the tests). Every step has its own time limit, so a slow step cannot eat the
# others; results go to $OUT/gpu_results_PART.json and one log, $OUT/gpu_log_PART.txt.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh train     # dry runs + training throughput, <= 585 s
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh latency   # inference latency, 2:4, tap groups, <= 355 s
#
# (the limits are the sum of the per-step limits; the device tool allows 600 s per command)
#
# Steps: (1) vgg8 --dry-run on CUDA with fp16/bf16, compiled and eager; (2) training
# throughput (dense / stage-1 / stage-2 steps, loaders, a full epoch) for VGG-8 compiled and
# eager, GoogLeNet and ViT-S; (3) inference latency, dense vs pruned, VGG-8 Top-1 and ViT-S
# 2:4 (with the 2:4 semi-structured deployment); tap groups (torch ops) against cuDNN in bf16.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tkp_gpu}
mkdir -p "$OUT" /tmp/tkp_gpu_json
PART=${1:-train}
LOG="$OUT/gpu_log_$PART.txt"
export PYTHONUNBUFFERED=1
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" >> "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s" >> "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" >> "$LOG" 2>&1

J=/tmp/tkp_gpu_json
if [ "$PART" = train ]; then
  for run in "fp16 --compile" "bf16 --compile" "bf16 --no-compile"; do
    set -- $run
    step "dry-run vgg8 $1 $2" 75 python vgg8_optimized.py --dry-run --amp-dtype "$1" "$2" --output-dir "/tmp/tkp_dry_$1$2"
  done
  step "throughput vgg8 compiled" 120 python benchmarks/train_throughput.py --script vgg8 --batch 128 \
    --num-workers 16 --compile on --json $J/throughput_vgg8_compiled.json
  step "throughput vgg8 eager" 60 python benchmarks/train_throughput.py --script vgg8 --batch 128 \
    --num-workers 16 --compile off --json $J/throughput_vgg8_eager.json
  step "throughput googlenet eager" 100 python benchmarks/train_throughput.py --script googlenet --batch 256 \
    --num-workers 16 --compile off --steps 10 --json $J/throughput_googlenet_eager.json
  step "throughput vit-s eager" 80 python benchmarks/train_throughput.py --script vit --batch 256 \
    --compile off --skip-epoch --steps 10 --json $J/throughput_vit_eager.json
else
  L=benchmarks/inference_latency.py
  step "latency vgg8 top-1" 80 python $L --script vgg8 --topk 1 --devices cuda --batch-sizes 1,256 \
    --json $J/latency_vgg8.json
  step "latency vit-s 2:4 eager + 2:4 deployment" 60 python $L --script vit --sparsity-type 2:4 --no-pretrained \
    --devices cuda --batch-sizes 1,256 --no-compile --json $J/latency_vit_eager.json
  step "latency vit-s 2:4 compiled" 110 python $L --script vit --sparsity-type 2:4 --no-pretrained \
    --devices cuda --batch-sizes 256 --json $J/latency_vit_compiled.json
  step "tap groups vs cudnn bf16" 60 python benchmarks/tap_group_cuda.py --device cuda --dtype bf16 \
    --batch 256 --json $J/tap_group_cuda.json
  step "dry-run vgg8 tap-group 32 bf16" 45 python vgg8_optimized.py --dry-run --tap-group 32 --amp-dtype bf16
fi

python - "$J" "$OUT/gpu_results_$PART.json" <<'EOF'
import json, sys
from pathlib import Path
results = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(results, indent=1) + "\n")
print("results:", ", ".join(results) or "none")
EOF
