"""DataLoader workers against none, in one run: the loop's timed steps (benchmarks/probe_parts.py's
`time_training`) on the probe's dry-run shape, alternating 0 and `--workers`, `--repeats` times each.

    python -m benchmarks.loader_workers --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import probe_parts as parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = parts.SHAPES["dry-run"]
    with tempfile.TemporaryDirectory(prefix="loader-workers-") as scratch:
        root = Path(scratch)
        parts.build_workspace(shape, root)
        figures = {0: [], args.workers: []}
        for repeat in range(args.repeats):
            for workers in figures:
                config = parts.probe_config(shape, root, f"w{workers}-{repeat}", "no", "--model.encoder_window=dynamic",
                                            f"--train.dataloader_num_workers={workers}")
                figures[workers].append(parts.time_training(config, float("nan"), (2, args.steps)))
    summary = {workers: {"samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
                         "data_wait_share": statistics.median(r["data_wait_share"] for r in runs)}
               for workers, runs in figures.items()}
    summary["ratio"] = summary[args.workers]["samples_per_s"] / summary[0]["samples_per_s"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
