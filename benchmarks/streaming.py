"""Streaming from shards against the cached path, on synthetic corpora of growing size (docs/data.md).

    python -m benchmarks.streaming --hours 1 5 20 --workers 0 1 2 --output streaming.json

Each corpus is the shipped training clips repeated under distinct ids (symbolic links) until it holds `--hours` of
audio, as a manifest. For each size, in fresh processes of `scripts/train.py` on the tiny model:
- cached: from a cold prepared-data cache (`data.num_proc=1`): seconds from launch to the end of the first
  optimizer step, and the process's peak RSS (VmHWM) then;
- shards: the shards written once by `scripts/prepare_data.py --shards` (timed on its own: a one-time cost that can
  run anywhere), then the same figures for a run with `data.streaming=true` from them.
Then, on the largest corpus's shards, `--steps` streamed steps with 0, 1 and 2 DataLoader workers: training
samples/s and the share of the step spent waiting for data, as the loop logs them (means of the log lines after
the first). `--workers_only DIR` measures only that, on the shards in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split, write_manifest

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
STEP_LINE = re.compile(r"step (\d+)/\d+ .* ([\d.]+) samples/s .* data wait ([\d.]+)%")
COMMON = ["--config", "quickstart", "--eval.guard_sets=[]", "--eval.eval_on_start=false", "--eval.select_on=test",
          "--data.train_splits=train", "--data.eval_split=test", "--train.logging_steps=1", "--data.num_proc=1",
          "--train.save_steps=100000", "--eval.eval_steps=100000", "--train.overwrite_output_dir=true"]


def make_corpus(folder: Path, hours: float) -> Path:
    """A manifest folder with `hours` of training audio (the shipped clips repeated) and the shipped test split."""
    cv = find_common_voice_dir(str(CORPUS))
    clips = [row for split in ("train", "dev") for row in read_common_voice_split(cv, split, SkipLog())]
    seconds = {row["path"]: int(row["duration[ms]"]) / 1000
               for row in map(lambda line: dict(zip(["path", "duration[ms]"], line.split("\t"))),
                              (cv / "clip_durations.tsv").read_text().splitlines()[1:])}
    (folder / "clips").mkdir(parents=True)
    rows, total, number = [], 0.0, 0
    while total < hours * 3600:
        row = clips[number % len(clips)]
        link = folder / "clips" / f"{number:07d}.mp3"
        link.symlink_to(row["audio_path"])
        rows.append({"audio_path": str(link), "text": row["text"], "client_id": row["client_id"]})
        total += seconds[Path(row["audio_path"]).name]
        number += 1
    write_manifest(folder / "train.csv", rows)
    write_manifest(folder / "test.csv", read_common_voice_split(cv, "test", SkipLog()))
    return folder


def first_step(args: list[str], output_dir: Path) -> dict:
    """Launches scripts/train.py, waits for its first step's log line, reads its peak RSS and stops it."""
    command = [sys.executable, str(PROJECT / "scripts" / "train.py"), *COMMON, "--output_dir", str(output_dir), *args]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(PROJECT)})
    tail = []
    try:
        for line in process.stdout:
            tail = (tail + [line])[-20:]
            if STEP_LINE.search(line):
                seconds = time.perf_counter() - started
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak_kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
                return {"seconds_to_first_step": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024)}
        raise RuntimeError("the run ended before its first step:\n" + "".join(tail))
    finally:
        process.kill()
        process.wait()


def throughput(args: list[str], output_dir: Path) -> dict:
    """A whole streamed run: means of samples/s and data wait over its log lines after the first (a window is read
    every `data.shuffle_buffer` rows: a median would hide that wait)."""
    command = [sys.executable, str(PROJECT / "scripts" / "train.py"), *COMMON, "--output_dir", str(output_dir), *args]
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    lines = [STEP_LINE.search(line) for line in (done.stdout + done.stderr).splitlines()]
    figures = [(float(m.group(2)), float(m.group(3))) for m in lines if m][1:]
    if done.returncode or not figures:
        raise RuntimeError(done.stderr[-3000:])
    return {"samples_per_s": round(statistics.mean(f[0] for f in figures), 2),  # log lines of equal step counts
            "data_wait_percent": round(statistics.mean(f[1] for f in figures), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[1, 5, 20])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="streamed steps per worker count")
    parser.add_argument("--workdir", default="", help="where corpora, shards and caches go (default: a temporary one)")
    parser.add_argument("--workers_only", default="", help="only the workers' figures, on the shards in this folder")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="streaming-bench-"))
    results: dict = {"sizes": {}}
    for hours in [] if args.workers_only else args.hours:
        corpus = make_corpus(root / f"corpus-{hours:g}h", hours)
        source = ["--data.source=manifest", f"--data.path={corpus}", "--train.max_steps=1000"]
        cached = first_step([*source, f"--data.cache_dir={root / f'cache-{hours:g}h'}"], root / f"cached-{hours:g}h")
        shards = root / f"shards-{hours:g}h"
        started = time.perf_counter()
        subprocess.run([sys.executable, str(PROJECT / "scripts" / "prepare_data.py"), *COMMON[:2], *source[:2],
                        *COMMON[4:8], "--data.num_proc=2", "--output_dir", str(root / f"prep-{hours:g}h"),
                        "--shards", str(shards)], cwd=PROJECT, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(PROJECT)})
        written = time.perf_counter() - started
        streamed = first_step(["--data.source=shards", f"--data.path={shards}", "--data.streaming=true",
                               "--train.max_steps=1000"], root / f"streamed-{hours:g}h")
        index = json.loads((shards / "train" / "index.json").read_text())
        results["sizes"][f"{hours:g}h"] = {"rows": index["rows"], "hours": index["hours"],
                                           "shard_bytes": index["bytes"], "shards_written_s": round(written, 1),
                                           "cached": cached, "streamed": streamed}
        print(json.dumps({f"{hours:g}h": results["sizes"][f"{hours:g}h"]}), flush=True)
    largest = Path(args.workers_only) if args.workers_only else root / f"shards-{max(args.hours):g}h"
    results["workers"] = {}
    for workers in args.workers:
        results["workers"][workers] = throughput(
            ["--data.source=shards", f"--data.path={largest}", "--data.streaming=true",
             f"--train.max_steps={args.steps}", f"--train.dataloader_num_workers={workers}",
             "--train.logging_steps=5"], root / f"workers-{workers}")
        print(json.dumps({"workers": workers, **results["workers"][workers]}), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
