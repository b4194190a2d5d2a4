"""Evaluate a saved model on a held-out split and write metrics.json, predictions.jsonl and report.md:

    python scripts/evaluate.py --model runs/whisper-small-hi/best --data.path /data/cv-corpus-17.0-2024-03-15 \\
        --data.eval_split test --output_dir runs/eval-test [--compare openai/whisper-small] [--html]

Decodes with the model folder's saved settings (language, task, max length, beams) unless --language, --task,
--num_beams (or --eval.generation_max_length) say otherwise. Data options come from --config PRESET and any
--section.key=value (`--help` lists them). `accelerate launch --num_processes N scripts/evaluate.py ...` splits
the work and gives the single-process result.
"""

import argparse
import sys

from accelerate import PartialState

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config_loading import load_config
from loop.model import ModelLoadError
from loop.report import DEFAULT_HTML_AUDIO_MB
from loop.sources import DataError
from loop.standalone_eval import DecodeOverrides, run_evaluation, summary_line


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__, sections=("data", "model", "eval"))
    parser.add_argument("--model", required=True, help="model folder (e.g. runs/NAME/best) or Hub id")
    parser.add_argument("--compare", default=None, help="a second model, evaluated on the same utterances")
    parser.add_argument("--html", action="store_true", help="also write report.html (errors marked, clips playable)")
    parser.add_argument("--html_audio_mb", type=float, default=DEFAULT_HTML_AUDIO_MB,
                        help="MB of clips report.html embeds, the highest-WER utterances first; 0 for none "
                             "(default: %(default)g)")
    parser.add_argument("--language", default=None, help="decode in this language (default: the model's own)")
    parser.add_argument("--task", default=None, choices=["transcribe", "translate"], help="default: the model's own")
    parser.add_argument("--num_beams", type=int, default=None, help="beam width (default: the model's own)")
    parser.add_argument("--encoder_window", default=None, choices=["full", "dynamic"],
                        help="decode at the full 30-s window or cut to each batch's longest clip (default: the window "
                             "the model was trained with, as its config.json records)")
    parser.add_argument("--timestamps", action="store_true",
                        help="also decode with timestamps, the clips one by one and packed 3 to a row, and report "
                             "well-formed share and boundary error (metrics.json: timestamps; README \"Timestamps\")")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="utterances per process per batch (default: eval.per_device_eval_batch_size)")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="fp16/bf16 need a GPU (default: no, or accelerate launch's setting)")
    args, overrides = parser.parse_known_args(argv)
    if args.html_audio_mb < 0:
        parser.error(f"--html_audio_mb must be 0 or more, got {args.html_audio_mb:g}")
    if not args.output_dir:
        parser.error("--output_dir is required: the folder for metrics.json, predictions.jsonl and report.md")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    # The decoding flags go through the config too, so a misspelt language is reported like any other option.
    checked = [f"--model.name_or_path={args.model}", *overrides]
    checked += [f"--model.language={args.language}"] if args.language else []
    try:
        config = load_config(args.config, checked, args.output_dir)
        decode = DecodeOverrides.from_command_line(args.language, args.task, args.num_beams, overrides,
                                                   args.encoder_window)
        metrics = run_evaluation(config, args.model, compare=args.compare, decode=decode, batch_size=args.batch_size,
                                 mixed_precision=args.mixed_precision, html=args.html,
                                 html_audio_mb=args.html_audio_mb, timestamps=args.timestamps)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    print(summary_line(metrics))
    if "compare" in metrics:
        print(summary_line(metrics["compare"]))
    written = ["metrics.json", "predictions.jsonl", "report.md", *(["report.html"] if args.html else [])]
    print(f"wrote {', '.join(written)} to {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
