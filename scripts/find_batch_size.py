"""Find the largest per-device training batch that fits on this GPU, and the accumulation that keeps the preset's
effective batch:

    python scripts/find_batch_size.py --config whisper-small-hi --data.path CV_DIR [--margin 0.1] [--section.key=value]

Real optimizer steps (the preset's model, precision, LoRA, gradient checkpointing, ...) on a worst-case batch: every
row the data's longest clip with its longest transcript, at the full 30-s window (loop/run/batch_size.py). Batches
double until one runs out of memory, then the boundary is bisected. Prints the largest that fits and a setting
`--margin` below it. Needs a CUDA GPU; on CPU it says so and stops. The data is prepared as for training (cached).
`--train.per_device_train_batch_size=auto` runs the same search at the start of training.
"""

import argparse
import sys

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.model.loading import ModelLoadError
from loop.run.batch_size import (
    MARGIN,
    MAX_BATCH_SIZE,
    NOTHING_FITS,
    CudaDevice,
    Device,
    effective_batch,
    search,
    suggestion,
)
from loop.train import optimizer_step, setup


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__)
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help="share of the largest batch to leave free (default: %(default)g)")
    parser.add_argument("--max_batch_size", type=int, default=MAX_BATCH_SIZE,
                        help="stop growing here (default: %(default)d)")
    args, overrides = parser.parse_known_args(argv)
    if not 0 <= args.margin < 1:
        parser.error(f"--margin must be at least 0 and below 1, got {args.margin:g}")
    if args.max_batch_size < 1:
        parser.error(f"--max_batch_size must be 1 or more, got {args.max_batch_size}")
    return args, overrides


def main(argv: list[str] | None = None, device: Device | None = None) -> int:
    """`device`: where the steps run and out-of-memory comes from (a CUDA GPU unless a test passes a stand-in)."""
    args, overrides = parse_args(argv)
    device = device or CudaDevice()
    if device.unavailable():
        print(f"error: scripts/find_batch_size.py {device.unavailable()}. Run it on the GPU machine that will train.",
              file=sys.stderr)
        return 2
    try:
        preset = load_config(args.config, overrides)
        largest = search(preset, device, setup, optimizer_step, args.max_batch_size)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if largest == 0:
        print(f"error: {NOTHING_FITS}", file=sys.stderr)
        return 1
    effective = effective_batch(preset.train)
    batch, accumulation = suggestion(largest, args.margin, effective)
    print(f"largest batch that fits: {largest}" + (" (--max_batch_size)" if largest == args.max_batch_size else ""))
    print(f"suggested, {args.margin:.0%} below it, for the preset's effective batch of {effective} per process: "
          f"--train.per_device_train_batch_size={batch} --train.gradient_accumulation_steps={accumulation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
