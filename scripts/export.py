"""Export a saved model for another runtime, then check that the export transcribes as the model does:

    python scripts/export.py --model runs/whisper-small-hi/best --quantization int8 \\
        --output_dir runs/whisper-small-hi/ct2-int8

--format ct2 (default) writes a CTranslate2 folder for `faster_whisper.WhisperModel(DIR)` (tokenizer, mel bins,
suppress tokens and alignment heads included); --format ggml the model file whisper.cpp loads; --format onnx an
encoder and a decoder for onnxruntime. The parity gate then transcribes --parity_clips clips of a split (--data.*
options, default the shipped test split assets/cv-corpus-17.0-synthetic) with the model and with the export in its
runtime, from the same waveforms, and writes DIR/parity.json; it exits 1 and writes DIR/FAILED when float32
transcripts differ or another export's WER is more than --wer_tolerance points worse. --no_parity skips the gate;
--parity_only runs it on an export already in --output_dir.
"""

import argparse
import sys
from pathlib import Path

from loop.cli import make_parser, one_line
from loop.config import ConfigError, resolve_path
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.extras import MissingExtra
from loop.model.loading import ModelLoadError
from loop.run.model_folder import model_folder
from loop.ship.export import ExportError, free_space, read_source_model
from loop.ship.formats import DESCRIPTIONS, FORMATS, QUANTIZATIONS, export_model
from loop.ship.parity import DEFAULT_CLIPS, DEFAULT_WER_TOLERANCE, FAILED_FILE, PARITY_FILE, read_clips, summary_line
from loop.ship.runtimes import run_parity

SHIPPED_CORPUS = "assets/cv-corpus-17.0-synthetic"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__, sections=("data",))
    parser.add_argument("--model", required=True, help="the model folder to export (runs/NAME/best or runs/NAME/checkpoints/step_N)")
    parser.add_argument("--format", default="ct2", choices=FORMATS,
                        help="; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items()))
    every = sorted({q for offered in QUANTIZATIONS.values() for q in offered})
    parser.add_argument("--quantization", default=None, choices=every,
                        help="how the weights are stored (default: the first listed); " + "; ".join(
                            f"{name}: {', '.join(offered)}" for name, offered in QUANTIZATIONS.items()))
    parser.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    parser.add_argument("--parity_clips", type=int, default=DEFAULT_CLIPS,
                        help="clips the parity check transcribes (default: %(default)s)")
    parser.add_argument("--no_parity", action="store_true", help="skip the parity check")
    parser.add_argument("--parity_only", action="store_true",
                        help="export nothing: run the parity check on the export already in --output_dir")
    parser.add_argument("--wer_tolerance", type=float, default=DEFAULT_WER_TOLERANCE,
                        help="WER points a quantized export may lose against the model (default: %(default)g)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the parity check decodes")
    parser.add_argument("--batch_size", type=int, default=8, help="clips per transformers batch in the parity check")
    args, overrides = parser.parse_known_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required: the folder the exported model is written to")
    if args.parity_clips < 1:
        parser.error(f"--parity_clips must be 1 or more, got {args.parity_clips} (--no_parity skips the check)")
    args.quantization = args.quantization or QUANTIZATIONS[args.format][0]
    if args.quantization not in QUANTIZATIONS[args.format]:
        parser.error(f"--quantization {args.quantization} is not offered for --format {args.format}: choose one of "
                     f"{', '.join(QUANTIZATIONS[args.format])}")
    if args.parity_only and args.no_parity:
        parser.error("--parity_only and --no_parity contradict each other: pass one")
    if args.wer_tolerance < 0:
        parser.error(f"--wer_tolerance must be 0 or more, got {args.wer_tolerance:g}")
    return args, overrides


def default_data(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The shipped corpus as the parity check's data, unless a preset or --data.path names the data."""
    named = args.config or any(option.split("=")[0] in ("--data.path", "--data.source") for option in overrides)
    return [] if named else [f"--data.path={resolve_path(SHIPPED_CORPUS)}"]


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        # Options are checked before the conversion, so a typo costs nothing.
        config = None if args.no_parity else load_config(args.config, [*default_data(args, overrides), *overrides])
        # A checkpoint (step_N) is written out as a save_pretrained folder first: the converter reads files.
        with model_folder(args.model) as folder:
            source = read_source_model(folder, label="" if folder == resolve_path(args.model) else args.model)
            if config is not None:  # the clips are read first: a split without usable clips stops before the export
                clips = read_clips(config, source.processor, source.config.max_target_positions, args.parity_clips)
            if args.parity_only:
                if not output_dir.is_dir():
                    raise ExportError(f"--parity_only: --output_dir {output_dir} is not a folder; export first")
            else:
                export_model(args.format, source, output_dir, args.quantization, overwrite=args.overwrite)
                print(f"exported {args.model} ({args.format}, {args.quantization}) to {output_dir}")
            if config is None:
                return 0
            report = run_parity(source.folder, output_dir, args.quantization, clips, export_format=args.format,
                                split=config.data.eval_split, wer_tolerance=args.wer_tolerance, device=args.device,
                                batch_size=args.batch_size)
    except (ConfigError, DataError, ExportError, ModelLoadError, MissingExtra) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # parity.json on a full disk
        print(f"error: could not write to {output_dir}: {error.strerror or error} ({free_space(output_dir)} on its "
              "filesystem)", file=sys.stderr)
        return 2
    if "transformers" in report:  # the runtime ran: both sides' figures
        print(summary_line(report))
    if report["failures"]:
        print(f"error: parity check failed: {'; '.join(report['failures'])} (details in {output_dir / PARITY_FILE}; "
              f"{output_dir / FAILED_FILE} marks the export as failed)", file=sys.stderr)
        return 1
    print(f"parity check passed; wrote {output_dir / PARITY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
