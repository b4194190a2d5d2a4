"""Search hyperparameters with Optuna over short runs of the real loop:

    python scripts/sweep.py --config whisper-small-hi --space sweep.yaml --trials 20 --output_dir runs/sweep-lr \\
        --train.max_steps=300 --eval.eval_steps=100 [--storage sqlite:///runs/sweep-lr/study.db]

sweep.yaml maps options to ranges, e.g. `train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}`,
`data.pack_to_seconds: {type: categorical, choices: [0, 30]}` (loop/sweeps.py). Every trial is an ordinary run
folder `OUTPUT_DIR/trial_<N>`; TPE picks the values, the median pruner stops a trial whose selection WER at an
evaluation is worse than the median of earlier trials there. The storage keeps finished trials: the same command
continues a sweep that was killed, and several machines given one RDB URL work on one study. At the end it writes
OUTPUT_DIR/summary.md (every trial, its WER and values) and OUTPUT_DIR/best.yaml, the best trial as a preset.
"""

import argparse
import json
import sys
from pathlib import Path

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.model.loading import ModelLoadError
from loop.run.batch_size import BatchSizeError
from loop.sweeps import MissingPackage, SweepSettings, load_space, open_study, run_sweep, summary, write_best_preset
from loop.train import train


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__)
    parser.add_argument("--space", required=True, help="the search space YAML")
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUTPUT_DIR/study.db)")
    parser.add_argument("--study", default=None, help="study name (default: OUTPUT_DIR's folder name)")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default: %(default)d)")
    parser.add_argument("--prune_startup_trials", type=int, default=5,
                        help="finished trials before pruning starts (default: %(default)d)")
    parser.add_argument("--prune_warmup_steps", type=int, default=0,
                        help="optimizer steps of a trial before it may be pruned (default: %(default)d)")
    parser.add_argument("--heartbeat_s", type=int, default=60,
                        help="a killed trial is run again once silent for twice this (default: %(default)d)")
    parser.add_argument("--enqueue", action="append", default=[],
                        help="values to try first, as a JSON object of option: value (repeatable; new study only)")
    args, overrides = parser.parse_known_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required: the sweep's folder (trials, study.db, summary.md, best.yaml)")
    if args.trials < 1:
        parser.error(f"--trials must be 1 or more, got {args.trials}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    sweep_dir = Path(args.output_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    settings = SweepSettings(storage=args.storage or f"sqlite:///{sweep_dir.resolve() / 'study.db'}",
                             study=args.study or sweep_dir.resolve().name, seed=args.seed,
                             prune_startup_trials=args.prune_startup_trials,
                             prune_warmup_steps=args.prune_warmup_steps, heartbeat_s=args.heartbeat_s)
    try:
        space = load_space(args.space)
        load_config(args.config, overrides)  # the preset and options checked before the first trial
        enqueue = [json.loads(values) for values in args.enqueue]
        study = open_study(settings)  # RuntimeError naming the extra when Optuna is missing
        print(f"study {settings.study!r} in {settings.storage}: {len(study.trials)} trials so far")
        run_sweep(study, args.config, overrides, space, sweep_dir, args.trials, train, enqueue)
    except json.JSONDecodeError as error:
        print(f"error: --enqueue: not a JSON object ({error})", file=sys.stderr)
        return 2
    except (ConfigError, DataError, ModelLoadError, MissingPackage, BatchSizeError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    table = summary(study)
    (sweep_dir / "summary.md").write_text(table, encoding="utf-8")
    print(table, end="")
    try:
        best = write_best_preset(study, args.config, overrides, sweep_dir / "best.yaml", str(sweep_dir / "best-run"))
    except ValueError:  # no trial completed: every one was pruned or failed
        print("no trial completed: no best.yaml", file=sys.stderr)
        return 1
    print(f"best: trial {study.best_trial.number}, selection WER {study.best_value:.2f}; preset {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
