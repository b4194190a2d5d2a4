#!/usr/bin/env bash
# The GPU checks in one command that ends within 10 minutes, for a short loan of a GPU machine: the probe (every
# figure as JSON, benchmarks/gpu_probe.py), then the tests marked gpu. OUT (default runs/) receives probe.json and
# the logs. WHEELS (default .whl) is the folder benchmarks/gpu_wheels.sh built, carried to the machine.
#   bash benchmarks/gpu_check.sh            # from the project root, on a machine with a CUDA torch
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
wheels="${WHEELS:-.whl}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1
timeout 480 python benchmarks/gpu_probe.py --wheels "$wheels" --output "$out/probe.json" 2>"$out/probe.log"
site="$(python -c 'import tempfile; print(tempfile.gettempdir())')/gpu-probe-site"  # where the probe installed
PYTHONPATH="$site:$PWD" timeout 100 python -m pytest -q -m gpu -x tests 2>&1 | tee "$out/gpu-tests.log" | tail -20
