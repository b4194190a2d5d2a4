"""The loop against the classic `Seq2SeqTrainer` recipe, measured in one invocation on one machine.

From the project root (with `loop` installed by `pip install -e .`):

    python -m benchmarks.run --shape tiny --repeats 3 --output bench.json     # CPU, whisper-tiny shapes
    python -m benchmarks.run --shape small --output bench.json                # GPU, whisper-small shapes
    python -m benchmarks.run --quick --output /tmp/bench.json                 # seconds: does it run?

Both sides get the same random-init model (one `save_pretrained` folder), the same clips of the shipped synthetic
corpus, batch size, precision and step counts. Each (side, repeat) runs in a fresh Python process, in the order
loop, reference, loop, reference, ..., so machine drift hits both sides and each process's peak memory is its own.
Figures are medians over the repeats; ratios are ours / reference.

Timed, on each side (benchmarks/sides.py):
- data preparation, clips/s: the training clips -> a prepared Arrow table. Ours: `loop.data.prepare.prepare` (decode,
  resample, tokenize, write int16 audio: features are computed in the step). Reference: the blog's `prepare_dataset`, one example per call, on the
  feature extractor's NumPy STFT. Both decode with `loop.data.audio.decode_audio`.
- training, samples/s: `timed_steps` optimizer steps after `warmup_steps`, data loading included. Ours:
  `loop.train.setup()`, then `loop.train.optimizer_step`, the function `fit()` runs once per step. Reference:
  `Seq2SeqTrainer.train()`, timed between step ends by a callback.
- evaluation, utterances/s: the eval clips decoded greedily to the same max length from the same (initial)
  weights. Ours: `loop.eval.evaluation.evaluate` over the longest-first loader at the larger eval batch. Reference:
  `trainer.predict` with `predict_with_generate` at the blog's eval batch, with the blog's WER `compute_metrics`.
  Both also compute the eval loss, as both recipes do.
- training with packed rows, utterances/s (ours only, `--packing`, a third process per repeat): the same steps on
  rows that each join consecutive clips up to the audio window (`data.pack_to_seconds`), against the reference's
  one utterance per row. Same model, batch of rows and step count; more utterances (and label tokens) per row.
- training and evaluation at the dynamic encoder window (ours only, `--dynamic`, a fourth process per repeat):
  `model.encoder_window=dynamic` with length-grouped batches (`train.group_by_length`), the same steps and clips.
- the prepared cache's bytes per clip, both sides (ours: int16 audio and labels; the recipe: log-mel features).

The report checks that both sides produced the same transcripts, and adds the analytic FLOPs (MFU on a GPU) and
the memory estimate of the whisper-small-hi preset (benchmarks/estimates.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.estimates import whisper_small_hi_memory
from benchmarks.settings import BenchSettings, parse_settings, validate
from benchmarks.sides import ChildSpec
from benchmarks.summary import format_report, machine_facts, summarize
from benchmarks.workspace import DYNAMIC, PACKED, PROJECT, SIDES, Workspace, prepare_workspace


def run_child(side: str, settings: BenchSettings, workspace: Workspace, label: str) -> dict:
    """Times `side` in a fresh Python process (`python -m benchmarks.sides`); returns its figures. The child's
    output goes to a log file whose end is shown if it fails."""
    spec = workspace.root / f"{label}.spec.json"
    result = workspace.root / f"{label}.result.json"
    log = workspace.root / f"{label}.log"
    spec.write_text(ChildSpec(side, settings, workspace.root).to_json())
    # The project root first on the path, so the child imports this checkout's `benchmarks` and `loop` (also
    # where PYTHONSAFEPATH keeps `-m` from adding the working folder).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # both sides take their precision from the settings
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "benchmarks.sides", str(spec), str(result)], cwd=PROJECT,
                               env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"benchmark child {label} failed with exit code {code}; end of {log}:\n{tail}")
    return json.loads(result.read_text())


def run_benchmark(settings: BenchSettings) -> dict:
    """The whole comparison: prints a table, writes `output`, returns the JSON object."""
    settings = settings.resolved()
    problems = validate(settings)
    if problems:
        raise ValueError("invalid benchmark settings:\n" + "\n".join(f"  - {p}" for p in problems))
    root = Path(settings.work_dir) if settings.work_dir else Path(tempfile.mkdtemp(prefix="whisper-loop-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        print(f"benchmark: shape {settings.shape}, workspace {root}", flush=True)
        workspace = prepare_workspace(settings, root)
        processes = SIDES + ((PACKED,) if settings.packing else ()) + ((DYNAMIC,) if settings.dynamic else ())
        runs: dict[str, list[dict]] = {side: [] for side in processes}
        for repeat in range(settings.repeats):
            for side in processes:
                began = time.perf_counter()
                runs[side].append(run_child(side, settings, workspace, f"{side}-{repeat}"))
                print(f"  repeat {repeat + 1}/{settings.repeats} {side}: {time.perf_counter() - began:.0f} s", flush=True)
        report = summarize(runs, settings, workspace.model_dir)
    finally:
        if not settings.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    report.update({
        "settings": asdict(settings),
        **machine_facts(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": time.perf_counter() - started,
        "memory_estimate_whisper_small_hi": whisper_small_hi_memory(),
    })
    print(format_report(report), flush=True)
    if settings.output:
        Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.output).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv, description=__doc__)
    try:
        run_benchmark(settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
