"""Benchmark the loop against the classic Seq2SeqTrainer recipe on this machine (see loop/benchmark.py).

    python scripts/benchmark.py --shape tiny --repeats 3 --output bench.json     # CPU
    python scripts/benchmark.py --shape small --output bench.json                # GPU
    python scripts/benchmark.py --quick --output /tmp/bench.json                 # seconds: does it run?
    python scripts/benchmark.py --shape tiny --fast_paths --repeats 2            # A/B tests of candidate speed-ups
"""

import argparse
import dataclasses
import sys

from loop.benchmark import BenchSettings, field_docs, run_benchmark


def parse_settings(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(BenchSettings)
    for field in dataclasses.fields(BenchSettings):
        default = field.default
        help_text = f"{docs.get(field.name, '')} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(f"--{field.name}", type=type(default), default=default, help=help_text)
    return BenchSettings(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    try:
        run_benchmark(settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
