"""Verify a run's checkpoints (and best/) against the SHA-256 checksums recorded when they were saved, without
starting a run:

    python scripts/verify_checkpoints.py runs/whisper-small-hi

Prints one line per checkpoint; exits 1 when any fails (a missing, truncated or corrupt file), 0 when all pass.
"""

import argparse
import sys

from loop.run.checkpoint_integrity import verify_run_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output folder (holding checkpoints/ and best/)")
    args = parser.parse_args(argv)
    lines, passed = verify_run_report(args.run_dir)
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
