"""Build the offline tiny Whisper: a BPE tokenizer trained on the corpus text (train and dev splits only, so
the test sentences stay unseen) with Whisper's special tokens, and a random-init model, as a save_pretrained folder.
`--shape v2` (80 mel bins, 99 language tokens: small, medium, large-v2) or `--shape v3` (128 mel bins and <|yue|>,
which moves the task and timestamp ids up by one: large-v3, large-v3-turbo).

    python scripts/make_tiny_model.py --output assets/tiny-whisper-hi
    python scripts/make_tiny_model.py --shape v3 --output assets/tiny-whisper-v3-hi
"""

import argparse

from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split
from loop.model.tiny import SHAPES, build_tiny_whisper

DEFAULT_OUTPUT = {"v2": "assets/tiny-whisper-hi", "v3": "assets/tiny-whisper-v3-hi"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--corpus", default="assets/cv-corpus-17.0-synthetic", help="Common Voice-layout folder")
    parser.add_argument("--splits", default="train,dev", help="splits whose sentences train the tokenizer")
    parser.add_argument("--shape", default="v2", choices=sorted(SHAPES),
                        help="v2: 80 mel bins, 99 languages; v3: 128 mel bins, <|yue|> and the ids after it moved by one")
    parser.add_argument("--output", default=None, help="folder to write (default: assets/tiny-whisper-hi for v2, "
                                                       "assets/tiny-whisper-v3-hi for v3)")
    parser.add_argument("--vocab_size", type=int, default=400, help="BPE tokens before Whisper's special tokens")
    parser.add_argument("--chunk_length", type=int, default=5, help="audio window in seconds (30 in real Whisper)")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage_dtype", default="float16", choices=["float16", "float32"],
                        help="weights as stored (the loop loads them in float32 either way)")
    args = parser.parse_args(argv)
    folder = find_common_voice_dir(args.corpus)
    sentences = [row["text"] for split in args.splits.split(",")
                 for row in read_common_voice_split(folder, split, SkipLog())]
    out = build_tiny_whisper(sentences, args.output or DEFAULT_OUTPUT[args.shape], shape=args.shape, vocab_size=args.vocab_size, chunk_length_s=args.chunk_length,
                             d_model=args.d_model, layers=args.layers, heads=args.heads, seed=args.seed,
                             storage_dtype=args.storage_dtype)
    print(f"wrote {out} ({args.shape} shape; tokenizer trained on {len(sentences)} sentences)")


if __name__ == "__main__":
    main()
