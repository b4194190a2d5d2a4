"""Export a saved model to CTranslate2 for faster-whisper, then check that the export transcribes as the model does:

    python scripts/export.py --model runs/whisper-small-hi/best --quantization int8 \\
        --output_dir runs/whisper-small-hi/ct2-int8

The folder loads with `faster_whisper.WhisperModel(DIR)` (tokenizer, mel bins, suppress tokens and alignment heads
included). The parity check then transcribes --parity_clips clips of a split (--data.* options, default the shipped
test split assets/cv-corpus-17.0-synthetic) with both models from the same waveforms and writes DIR/parity.json;
it exits non-zero when float32 transcripts differ or a quantized export's WER is more than --wer_tolerance points
worse. --no_parity skips it.
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
from loop.ship.export import (
    FORMATS,
    QUANTIZATIONS,
    ExportError,
    export_ct2,
    export_readme,
    free_space,
    read_source_model,
)
from loop.ship.parity import DEFAULT_CLIPS, DEFAULT_WER_TOLERANCE, PARITY_FILE, read_clips, run_parity, summary_line

SHIPPED_CORPUS = "assets/cv-corpus-17.0-synthetic"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = make_parser(__doc__, sections=("data",))
    parser.add_argument("--model", required=True, help="the model folder to export (runs/NAME/best or runs/NAME/checkpoints/step_N)")
    parser.add_argument("--format", default="ct2", choices=FORMATS, help="ct2: CTranslate2, for faster-whisper")
    parser.add_argument("--quantization", default="float32", choices=QUANTIZATIONS,
                        help="how the weights are stored (default: %(default)s; int8 is about 4 times smaller)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    parser.add_argument("--parity_clips", type=int, default=DEFAULT_CLIPS,
                        help="clips the parity check transcribes (default: %(default)s)")
    parser.add_argument("--no_parity", action="store_true", help="skip the parity check")
    parser.add_argument("--wer_tolerance", type=float, default=DEFAULT_WER_TOLERANCE,
                        help="WER points a quantized export may lose against the model (default: %(default)g)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the parity check decodes")
    parser.add_argument("--batch_size", type=int, default=8, help="clips per transformers batch in the parity check")
    args, overrides = parser.parse_known_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required: the folder the exported model is written to")
    if args.parity_clips < 1:
        parser.error(f"--parity_clips must be 1 or more, got {args.parity_clips} (--no_parity skips the check)")
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
            export_ct2(source, output_dir, args.quantization, overwrite=args.overwrite,
                       readme=export_readme(source, output_dir, args.quantization))
            print(f"exported {args.model} ({args.quantization}) to {output_dir}")
            if config is None:
                return 0
            report = run_parity(source.folder, output_dir, args.quantization, clips, split=config.data.eval_split,
                                wer_tolerance=args.wer_tolerance, device=args.device, batch_size=args.batch_size)
    except (ConfigError, DataError, ExportError, ModelLoadError, MissingExtra) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # parity.json on a full disk
        print(f"error: could not write to {output_dir}: {error.strerror or error} ({free_space(output_dir)} on its "
              "filesystem)", file=sys.stderr)
        return 2
    print(summary_line(report))
    if report["failures"]:
        print(f"error: parity check failed: {'; '.join(report['failures'])} (details in {output_dir / PARITY_FILE})",
              file=sys.stderr)
        return 1
    print(f"parity check passed; wrote {output_dir / PARITY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
