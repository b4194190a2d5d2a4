"""Pseudo-label a source's split with a (fine-tuned) teacher, for distillation on the teacher's own transcripts:

    python scripts/pseudo_label.py --model runs/whisper-small-hi/best --data.path /data/cv-corpus-17.0-2024-03-15 \\
        [--split train] [--wer_threshold 10] [--output_dir DIR]

Reads any source the data layer reads (`--data.source`, `--data.path`, ...; a manifest may lack the transcript
column: unlabelled audio), decodes every row as the model folder says, and writes `<split>_pseudo.csv` (a manifest:
audio, sentence = the pseudo-label, client_id, id, the human label and the row's WER against it) and
`<split>_pseudo.report.json` beside the originals (or in --output_dir). --wer_threshold drops rows whose WER against
their human label is above it. Resumable and safe to kill: rerun the same command and it decodes only the parts
not yet written. Train on the result with `--data.source=manifest --data.path=<that folder>
--data.train_splits=<split>_pseudo` (docs/distillation.md).
"""

import sys

from loop.cli import make_parser, one_line
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.eval.pseudo_labels import DEFAULT_PART_ROWS, pseudo_label
from loop.model.loading import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, sections=("data", "model"))
    parser.add_argument("--model", required=True, help="the teacher: model folder (e.g. runs/NAME/best) or Hub id")
    parser.add_argument("--split", default="train", help="the split to pseudo-label (default: %(default)s)")
    parser.add_argument("--wer_threshold", type=float, default=None,
                        help="drop rows whose normalized WER against their human label is above this (percent; "
                             "rows without one are kept; default: keep all)")
    parser.add_argument("--batch_size", type=int, default=16, help="clips per generation batch (default: %(default)s)")
    parser.add_argument("--part_rows", type=int, default=DEFAULT_PART_ROWS,
                        help="rows per part file, the unit a rerun resumes from (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    if args.wer_threshold is not None and args.wer_threshold < 0:
        parser.error(f"--wer_threshold must be 0 or more, got {args.wer_threshold:g}")
    if args.batch_size < 1 or args.part_rows < 1:
        parser.error("--batch_size and --part_rows must be 1 or more")
    try:
        config = load_config(args.config, [f"--model.name_or_path={args.model}", *overrides])
        pseudo_label(config, args.model, args.split, args.output_dir, wer_threshold=args.wer_threshold,
                     batch_size=args.batch_size, part_rows=args.part_rows)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
