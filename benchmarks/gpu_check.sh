#!/usr/bin/env bash
# The GPU checks of the speed issue in one run that ends within 10 minutes, for a short loan of a GPU machine:
# whisper-small shapes, bf16 (the H100/H200 setting), the loop at the full and at the dynamic window against the
# Seq2SeqTrainer recipe, one repeat; MFU, CUDA peak memory and the projected minutes for the recipe's 4000 x 16
# samples are in the printed table and in $OUT/bench-small.json (OUT defaults to runs/).
#   bash benchmarks/gpu_check.sh            # from the project root, in an environment with a CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
timeout 540 python -m benchmarks.run --shape small --precision bf16 --repeats 1 --no-packing \
    --peak_tflops 989 --output "$out/bench-small.json" 2>&1 | tee "$out/bench-small.log"
