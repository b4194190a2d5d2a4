"""What `train.deterministic` costs: one run, its optimizer steps taken alternately with torch's deterministic
kernels off and on (blocks of `--block` steps, ABAB...), so that both arms see the same machine load, the same
batches on average and the same model size.

    python -m benchmarks.determinism [--config quickstart] [--steps 120] [--block 10] [--threads 2] [overrides]

Prints steps/s of each arm (wall clock, median over blocks) and their ratio. `train.deterministic` itself only
switches `torch.use_deterministic_algorithms` (and, on CUDA, the cuBLAS workspace and cuDNN benchmark, set once
for the process): toggling that switch between steps measures exactly what the option changes on this device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from loop.config.loading import load_config
from loop.run.determinism import make_deterministic
from loop.train import endless_batches, optimizer_step, setup
from loop.train_log import WaitClock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps measured, both arms together")
    parser.add_argument("--block", type=int, default=10, help="steps per block before switching arms")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op CPU threads")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = tempfile.mkdtemp(prefix="determinism-benchmark-")
    config = load_config(args.config, ["--train.report_to=none", "--train.warmup_steps=0", *overrides], output_dir)
    print(make_deterministic())  # the process-wide part (cuBLAS workspace, cuDNN benchmark off); toggled below
    run = setup(config)
    batches = WaitClock(endless_batches(run))
    optimizer_step(run, batches)  # warm-up: first-call allocations and kernel selection
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for block in range(max(2, args.steps // args.block)):
        deterministic = block % 2 == 1
        torch.use_deterministic_algorithms(deterministic)
        started = time.perf_counter()
        for _ in range(args.block):
            optimizer_step(run, batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds[deterministic].append((time.perf_counter() - started) / args.block)
    rate = {arm: 1 / statistics.median(values) for arm, values in seconds.items()}
    print(f"{config.model.name_or_path}, batch {config.train.per_device_train_batch_size}, {args.threads} threads, "
          f"{run.accelerator.device}: deterministic off {rate[False]:.2f} steps/s, on {rate[True]:.2f} steps/s "
          f"({(rate[True] / rate[False] - 1) * 100:+.1f}%), {len(seconds[True])} blocks of {args.block} steps each")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
