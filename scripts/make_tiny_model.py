"""Build the offline tiny Whisper: a BPE tokenizer trained on the corpus text (train and dev splits only, so
the test sentences stay unseen) with Whisper's special tokens, and a random-init model, as a save_pretrained folder.

    python scripts/make_tiny_model.py --corpus assets/cv-corpus-17.0-synthetic --output assets/tiny-whisper-hi
"""

import argparse

from loop.sources import SkipLog, find_common_voice_dir, read_common_voice_split
from loop.tiny_model import build_tiny_whisper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--corpus", default="assets/cv-corpus-17.0-synthetic", help="Common Voice-layout folder")
    parser.add_argument("--splits", default="train,dev", help="splits whose sentences train the tokenizer")
    parser.add_argument("--output", default="assets/tiny-whisper-hi")
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
    out = build_tiny_whisper(sentences, args.output, vocab_size=args.vocab_size, chunk_length_s=args.chunk_length,
                             d_model=args.d_model, layers=args.layers, heads=args.heads, seed=args.seed,
                             storage_dtype=args.storage_dtype)
    print(f"wrote {out} (tokenizer trained on {len(sentences)} sentences)")


if __name__ == "__main__":
    main()
