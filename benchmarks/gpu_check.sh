#!/usr/bin/env bash
# The GPU checks of fedmae in one run (for a lent GPU machine; see docs/speed.md): the MAE step against MONAI's for the BTCV and ChestX-ray14 recipes (TFLOP/s, MFU
# against the measured bf16 matmul peak, flash attention, images/s, and torch.compile), the 3-D
# loader against the step at paper size, and short GPU smoke runs of `fedmae pretrain` and
# `fedmae compare` on the built-in data. Everything it prints is also written under ${OUT:-gpu-check}.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   QUICK=1 bash benchmarks/gpu_check.sh    # tiny sizes: checks the script itself (runs on a CPU too)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
status=0
step() {  # step NAME COMMAND...: run, keep going on failure, remember it
    echo "=== $1 ($(date +%T))" | tee -a "$out/summary.txt"
    shift
    "$@" 2>&1 | tee -a "$out/log.txt" | grep -v Warning | tail -25 | tee -a "$out/summary.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "FAILED with status $rc" | tee -a "$out/summary.txt"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/summary.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$out/summary.txt"

if [ -n "${QUICK:-}" ]; then
    steps="--steps 2 --warmup 1"
    step "MAE step, BTCV recipe (quick)" python benchmarks/bench_mae_step.py --preset btcv --batch 1 $steps --no-memory --json "$out/step_btcv.json"
    step "MAE step, ChestX-ray14 recipe (quick)" python benchmarks/bench_mae_step.py --preset cxr14 --batch 2 $steps --no-memory --json "$out/step_cxr14.json"
    step "3-D loader vs step (quick)" python benchmarks/bench_loader_3d.py --volumes 2 --steps 1 --warmup 0 --epochs 1 --min-seconds 0 --workers 0 --json "$out/loader.json"
    epochs=4; ft=2; device=auto
else
    step "MAE step, BTCV recipe (ViT-B/16 96^3, decoder 384x8, batch 24)" python benchmarks/bench_mae_step.py --preset btcv --compile --json "$out/step_btcv.json"
    step "MAE step, ChestX-ray14 recipe (ViT-B/16 224^2, decoder 256x8, batch 256)" python benchmarks/bench_mae_step.py --preset cxr14 --compile --json "$out/step_cxr14.json"
    step "3-D loader vs step at paper size (memory cache, workers 0/4/8)" python benchmarks/bench_loader_3d.py --preset paper --workers 0 4 8 --json "$out/loader.json"
    epochs=20; ft=10; device=cuda
fi
step "fedmae pretrain on the GPU (built-in data)" fedmae pretrain --config configs/demo.yaml --output "$out/pretrain" \
    --set pretrain.epochs=$epochs --set pretrain.warmup_epochs=1 --set device=$device
step "fedmae compare on the GPU (built-in data, every arm, parallel auto)" fedmae compare --config configs/demo.yaml \
    --output "$out/compare" --set pretrain.epochs=$epochs --set pretrain.warmup_epochs=1 --set finetune.epochs=$ft \
    --set finetune.warmup_epochs=1 --set federated.round_timeout=600 --set device=$device
echo "=== done: status $status; files in $out" | tee -a "$out/summary.txt"
exit $status
