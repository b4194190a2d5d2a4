"""Evaluate a saved model on a held-out split and write metrics.json, predictions.jsonl and report.md:

    python scripts/evaluate.py --model runs/whisper-small-hi/best --data.path /data/cv-corpus-17.0-2024-03-15 \\
        --data.eval_split test --output_dir runs/eval-test [--compare openai/whisper-small] [--html]

--model runs/NAME/checkpoints/step_N evaluates one checkpoint as the loop decoded at that step (the run's base
model and settings); --model runs/NAME scores every intact checkpoint and best/ and writes run_scores.md,
run_scores.json and run_scores.png (test WER by step beside the loop's selection WER), docs/checkpoints.md.

Decodes with the model folder's saved settings (language, task, max length, beams) unless --language, --task,
--num_beams (or --eval.generation_max_length) say otherwise. --eval.assistant_model=DIR decodes --model greedily by
speculative decoding with DIR (a smaller model with the same tokenizer) drafting tokens: the same transcripts. Data options come from --config PRESET and any
--section.key=value (`--help` lists them). `accelerate launch --num_processes N scripts/evaluate.py ...` splits
the work and gives the single-process result.

--long_form also joins the split's clips into recordings of --long_form_min_s to --long_form_max_s seconds (a
speaker's clips together where possible) and transcribes them with Whisper's sequential long-form generation and
with the pipeline's chunked decoding, scored side by side (loop/eval/long_form.py; on the main process only).
"""

import argparse
import sys

from accelerate import PartialState

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.eval.long_form import (
    DEFAULT_BOUNDARY_WORDS,
    DEFAULT_GAP_S,
    DEFAULT_MAX_S,
    DEFAULT_MIN_S,
    LongFormOptions,
)
from loop.eval.long_form import summary_line as long_form_line
from loop.eval.report import DEFAULT_HTML_AUDIO_MB
from loop.eval.run_scores import SCORES_FILE, score_run, scores_markdown
from loop.eval.saved_model import DecodeOverrides, run_evaluation, summary_line
from loop.extras import MissingExtra
from loop.model.loading import ModelLoadError
from loop.run.model_folder import identify, saved_run_config


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__, sections=("data", "model", "eval"))
    parser.add_argument("--model", required=True,
                        help="runs/NAME/best, runs/NAME/checkpoints/step_N, a Hub id, or a run folder runs/NAME "
                             "(every intact checkpoint and best/, a table and a picture by step)")
    parser.add_argument("--guard_sets", action="store_true",
                        help="with a run folder: score every model on eval.guard_sets too (the run's own, unless "
                             "--config or --eval.guard_sets names others)")
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
                             "well-formed share and boundary error (metrics.json: timestamps; "
                             "docs/timestamps-and-long-form.md)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="utterances per process per batch (default: eval.per_device_eval_batch_size)")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="fp16/bf16 need a GPU (default: no, or accelerate launch's setting)")
    long_form = parser.add_argument_group("long-form transcription")
    long_form.add_argument("--long_form", action="store_true",
                           help="also transcribe long recordings joined from the split's clips, sequential long-form "
                                "against chunked decoding (metrics.json's long_form, long_form_predictions.jsonl)")
    long_form.add_argument("--long_form_min_s", type=float, default=DEFAULT_MIN_S,
                           help="shortest recording in seconds, over the model's window (default: %(default)g)")
    long_form.add_argument("--long_form_max_s", type=float, default=DEFAULT_MAX_S,
                           help="longest recording in seconds (default: %(default)g)")
    long_form.add_argument("--long_form_gap_s", type=float, default=DEFAULT_GAP_S,
                           help="seconds of silence between joined clips (default: %(default)g)")
    long_form.add_argument("--long_form_boundary_words", type=int, default=DEFAULT_BOUNDARY_WORDS,
                           help="reference words on each side of a window boundary whose deletions and insertions "
                                "count as lost or repeated there (default: %(default)d)")
    long_form.add_argument("--long_form_fallback", action="store_true",
                           help="sequential decoding with OpenAI's temperature fallback and conditioning on the "
                                "previous text (samples: figures vary from run to run); default greedy without them")
    args, overrides = parser.parse_known_args(argv)
    if args.html_audio_mb < 0:
        parser.error(f"--html_audio_mb must be 0 or more, got {args.html_audio_mb:g}")
    if not args.output_dir:
        parser.error("--output_dir is required: the folder for metrics.json, predictions.jsonl and report.md")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        source = identify(args.model, allow_run=True)
        # A checkpoint or a run decodes with its run's base model; without --config, its run's settings (data, cache,
        # guard sets) are the starting point, so `--model runs/NAME` alone scores it on the run's own test split.
        base = source.run_config.model.name_or_path if source.run_config is not None else args.model
        preset = args.config or (saved_run_config(source) if source.run_config is not None else None)
        # The decoding flags go through the config too, so a misspelt language is reported like any other option.
        checked = [f"--model.name_or_path={base}", *overrides]
        checked += [f"--model.language={args.language}"] if args.language else []
        config = load_config(preset, checked, args.output_dir)
        decode = DecodeOverrides.from_command_line(args.language, args.task, args.num_beams, overrides,
                                                   args.encoder_window, config.eval)
        if source.kind == "run":
            if args.compare or args.long_form or args.timestamps or args.html:
                raise ConfigError([f"--model {args.model} is a whole run: --compare, --long_form, --timestamps and "
                                   "--html take one model (pass best/ or checkpoints/step_N)"])
            result = score_run(config, source.location, decode=decode, batch_size=args.batch_size,
                               mixed_precision=args.mixed_precision, guard_sets=args.guard_sets)
            if PartialState().is_main_process:
                print(scores_markdown(result), end="")
                print(f"wrote {SCORES_FILE}.md, {SCORES_FILE}.json, {SCORES_FILE}.png and each model's metrics to "
                      f"{config.output_dir}")
            return 0
        long_form = (LongFormOptions(args.long_form_min_s, args.long_form_max_s, args.long_form_gap_s,
                                     args.long_form_boundary_words, args.long_form_fallback)
                     if args.long_form else None)
        metrics = run_evaluation(config, args.model, compare=args.compare, decode=decode, batch_size=args.batch_size,
                                 mixed_precision=args.mixed_precision, html=args.html,
                                 html_audio_mb=args.html_audio_mb, long_form=long_form,
                                 timestamps=args.timestamps)
    except (ConfigError, DataError, ModelLoadError, MissingExtra) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    print(summary_line(metrics))
    if "compare" in metrics:
        print(summary_line(metrics["compare"]))
    if "long_form" in metrics:
        print(long_form_line(metrics["long_form"]))
    written = ["metrics.json", "predictions.jsonl", *(["compare_predictions.jsonl"] if args.compare else []),
               *(["long_form_predictions.jsonl"] if args.long_form else []), "report.md",
               *(["report.html"] if args.html else [])]
    print(f"wrote {', '.join(written)} to {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
