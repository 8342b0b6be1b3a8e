#!/usr/bin/env bash
# The GPU checks of issues 2-6 and 24 in prepared runs (for a lent GPU machine; nothing here is
# needed by the tests). Every step has its own time limit, so a slow step cannot eat the
# others; each part's results go to $OUT/gpu_results_PART.json, its log to $OUT/gpu_log_PART.txt,
# and every step's own JSON to $OUT/json_PART/ as soon as the step writes it.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh train     # dry runs + training throughput
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh latency   # inference latency, 2:4, tap groups
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh extra     # GoogLeNet, fp16 compiled, ViT 2:4 compiled
#
# A part takes at most the sum of its step limits (train 290 s, latency 270 s, extra 330 s),
# plus 10 s per step to kill a stuck one and up to 70 s for the version lines. A lent GPU comes
# with 15 minutes in all, its start included: usually enough for train and latency (if every
# step ran into its limit, about 400 + 380 s), or for one of them run again after a fix; extra
# is for a session that has time left. Run train first.
#
# Steps: (1) vgg8 --dry-run on CUDA, bf16 compiled and fp16 eager; (2) training throughput
# (dense / stage-1 / stage-2 steps, loaders, a full epoch) for VGG-8 compiled and ViT-S eager;
# (3) inference latency, dense vs pruned, VGG-8 Top-1 and ViT-S 2:4 with the 2:4
# semi-structured deployment; tap groups (torch ops) against cuDNN in bf16; VGG-8 eager
# throughput; (extra) GoogLeNet throughput, fp16 compiled and tap-group (eager) dry runs,
# ViT-S 2:4 compiled. tests/test_benchmarks.py parses every step's flags with its target's parser.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tkp_gpu}
PART=${1:-train}
case "$PART" in
  train|latency|extra) ;;
  *) echo "gpu_check.sh: PART must be train, latency or extra (got $PART)" >&2; exit 2 ;;
esac
J="$OUT/json_$PART"
DRY=/tmp/tkp_dry_$PART
rm -rf "$J" "$DRY"  # a rerun on a warm machine starts clean: nothing stale is reported
mkdir -p "$J"
LOG="$OUT/gpu_log_$PART.txt"
export PYTHONUNBUFFERED=1
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" >> "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s" >> "$LOG"
}

timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
timeout -k 5 40 python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" >> "$LOG" 2>&1

L=benchmarks/inference_latency.py
case "$PART" in
  train)
    step "dry-run vgg8 bf16 compiled" 75 python vgg8_optimized.py --dry-run --amp-dtype bf16 --compile \
      --output-dir "$DRY/bf16_compiled"
    step "dry-run vgg8 fp16 eager" 40 python vgg8_optimized.py --dry-run --amp-dtype fp16 --no-compile \
      --output-dir "$DRY/fp16_eager"
    step "throughput vgg8 compiled" 105 python benchmarks/train_throughput.py --script vgg8 --batch 128 \
      --num-workers 16 --compile on --json "$J/throughput_vgg8_compiled.json"
    step "throughput vit-s eager" 70 python benchmarks/train_throughput.py --script vit_small --batch 256 \
      --compile off --skip-epoch --steps 10 --json "$J/throughput_vit_eager.json"
    ;;
  latency)
    step "latency vgg8 top-1" 80 python $L --script vgg8 --topk 1 --devices cuda --batch-sizes 1,256 \
      --json "$J/latency_vgg8.json"
    step "latency vit-s 2:4 eager + 2:4 deployment" 70 python $L --script vit_small --sparsity-type 2:4 \
      --no-pretrained --devices cuda --batch-sizes 1,256 --no-compile --json "$J/latency_vit_eager.json"
    step "tap groups vs cudnn bf16" 60 python benchmarks/tap_group_cuda.py --device cuda --dtype bf16 \
      --batch 256 --json "$J/tap_group_cuda.json"
    step "throughput vgg8 eager" 60 python benchmarks/train_throughput.py --script vgg8 --batch 128 \
      --num-workers 16 --compile off --skip-epoch --json "$J/throughput_vgg8_eager.json"
    ;;
  extra)
    step "throughput googlenet eager" 100 python benchmarks/train_throughput.py --script googlenet --batch 256 \
      --num-workers 16 --compile off --steps 10 --json "$J/throughput_googlenet_eager.json"
    step "dry-run vgg8 fp16 compiled" 75 python vgg8_optimized.py --dry-run --amp-dtype fp16 --compile \
      --output-dir "$DRY/fp16_compiled"
    step "dry-run vgg8 tap-group 32 bf16" 45 python vgg8_optimized.py --dry-run --tap-group 32 --amp-dtype bf16 \
      --no-compile --output-dir "$DRY/tap_group"
    step "latency vit-s 2:4 compiled" 110 python $L --script vit_small --sparsity-type 2:4 --no-pretrained \
      --devices cuda --batch-sizes 256 --json "$J/latency_vit_compiled.json"
    ;;
esac

python - "$J" "$OUT/gpu_results_$PART.json" <<'EOF'
import json, sys
from pathlib import Path
results = {}
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        results[p.stem] = json.loads(p.read_text())
    except ValueError as e:  # a step stopped while writing: the others still count
        results[p.stem] = {"unreadable": str(e)}
Path(sys.argv[2]).write_text(json.dumps(results, indent=1) + "\n")
print("results:", ", ".join(results) or "none")
EOF
