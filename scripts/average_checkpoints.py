"""Average the weights of a run's last K checkpoints into a model folder and score it:

    python scripts/average_checkpoints.py runs/whisper-small-hi --last 3 [--output DIR] [--data.eval_split test]

The folder (default `RUN_DIR/average-last-K`) is an ordinary `save_pretrained` folder like `best/`, with its
processor and generation config; it is then evaluated like `scripts/evaluate.py` would, on the run's own data
settings (its config.json, or --config PRESET) with any --section.key=value on top; metrics.json, predictions.jsonl
and report.md go to --output_dir (default `RUN_DIR/average-last-K-eval`). --no_eval only writes the folder; --ema
averages the checkpoints' EMA of the weights (train.ema_decay) instead, so `--last 1 --ema` is the final EMA.
Keep enough checkpoints for it: train.save_total_limit.
"""

import sys
from pathlib import Path

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.eval.saved_model import run_evaluation, summary_line
from loop.model.loading import ModelLoadError
from loop.run.averaging import WEIGHTS_FILE, AveragingError, last_checkpoints, write_averaged_model
from loop.run.ema import EMA_FILE


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, sections=("data", "model", "eval"))
    parser.add_argument("run_dir", help="a training run's output_dir (with checkpoints/ and best/)")
    parser.add_argument("--last", type=int, required=True, help="average the newest this many checkpoints")
    parser.add_argument("--output", default=None, help="the model folder to write (default RUN_DIR/average-last-K)")
    parser.add_argument("--ema", action="store_true",
                        help="average the checkpoints' EMA (train.ema_decay) instead of their weights; --last 1 "
                             "gives the EMA of the newest checkpoint")
    parser.add_argument("--no_eval", action="store_true", help="write the folder only")
    args, overrides = parser.parse_known_args(argv)
    run_dir = Path(args.run_dir)
    output = Path(args.output or run_dir / f"average{'-ema' if args.ema else ''}-last-{args.last}")
    try:
        checkpoints = last_checkpoints(run_dir, args.last)
        write_averaged_model(run_dir, checkpoints, output, EMA_FILE if args.ema else WEIGHTS_FILE)
        print(f"averaged {'the EMA of ' if args.ema else ''}{', '.join(path.name for path in checkpoints)} into "
              f"{output}")
        if args.no_eval:
            return 0
        config = load_config(args.config or str(run_dir / "config.json"), overrides,
                             args.output_dir or f"{output}-eval")
        metrics = run_evaluation(config, str(output))
    except (AveragingError, ConfigError, DataError, ModelLoadError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(summary_line(metrics))
    print(f"wrote metrics.json, predictions.jsonl and report.md to {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
