"""Make a distillation student from a (fine-tuned) Whisper: the teacher's encoder and a few of its decoder layers.

    python scripts/make_student.py --teacher runs/whisper-small-hi/best --decoder_layers 2 \\
        --output runs/whisper-small-hi-student

The student copies every encoder layer (or --encoder_layers of them, maximally spaced) and --decoder_layers
maximally spaced decoder layers (first and last for 2), and keeps the teacher's tokenizer, feature extractor and
generation config: an ordinary model folder for `--model.name_or_path` with `--train.distill_from` (docs/distillation.md).
"""

import argparse
import sys

from loop.model.loading import ModelLoadError
from loop.model.student import make_student


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--teacher", required=True, help="model folder (e.g. runs/NAME/best) or Hub id")
    parser.add_argument("--decoder_layers", type=int, default=2, help="decoder layers of the student (default: 2)")
    parser.add_argument("--encoder_layers", type=int, default=None,
                        help="encoder layers of the student (default: all of the teacher's)")
    parser.add_argument("--output", required=True, help="folder to write the student to")
    args = parser.parse_args(argv)
    try:
        output, layers = make_student(args.teacher, args.output, args.decoder_layers, args.encoder_layers)
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}: encoder layers {layers.encoder}, decoder layers {layers.decoder} of {args.teacher}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
