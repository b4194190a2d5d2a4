"""The GPU probe: the recipe measured on one GPU in one command, every figure printed as JSON.

    bash benchmarks/gpu_wheels.sh .whl                                     # where pip reaches PyPI
    python benchmarks/gpu_probe.py --wheels .whl --output probe.json        # on the GPU machine, < 8 min on an H100
    python benchmarks/gpu_probe.py --dry-run --output probe-dry.json      # the same code on a CPU, tiny shapes

On a machine with a CUDA torch and no package registry it first installs, from the `--wheels` folder, each package
the machine lacks or has older (`pip install --no-index --no-deps --target`, never torch, triton or NVIDIA's
libraries), then runs again with them on its path. Then, on a whisper-small-shaped random-init model with Whisper's
real vocabulary (51,865) and clips of Common Voice Hindi's durations (5 s mean), each part in turn
(benchmarks/probe_parts.py), each printed as one JSON line when done, all of them in `--output` at the end:

- `gemm`: the measured bf16 peak of an 8k matrix product, what MFU divides by;
- `speed_*`: the recipe's fp16 8 x 2 and bf16, each at the full and at the dynamic window, with the presets' 4
  DataLoader workers: samples/s, MFU, peak memory, the data-wait share of a step; with fp16 also evaluation
  utterances/s, checkpoint and best/ save seconds; and fp16 at the dynamic window with 0 workers (the default);
- `nonfinite`: an fp16 run with a forced gradient overflow and a NaN loss: both skipped, the schedule held;
- `resume`: 2 + 2 steps with a stop and `--train.resume=true` against 4 straight (`train.deterministic`);
- `lora`, `qlora`: one step each through `fit()`, the adapter checkpoint loaded back, best/ merged;
- `compile` (last, GPU only): `train.torch_compile` on at the full window: warm-up seconds (compiling) and
  samples/s, against `speed_fp16_full`;
- `fsdp`: accelerate_configs/fsdp.yaml on one GPU through a save and `finish()`;
- `projection`: the recipe's 4000 x 16 in minutes, evaluations, saves and the final test included, for
  whisper-small-hi (full window) and whisper-small-hi-fast (dynamic).

A part that fails records its error and the others go on; parts that would start after `--budget_s` are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
NEVER_INSTALLED = ("torch", "triton", "torchvision", "torchaudio", "nvidia")  # the machine's CUDA build stays
INSTALLED_ENV = "GPU_PROBE_INSTALLED"


def wheel_distribution(path: Path) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return name.lower().replace("_", "-"), version


def lacking_wheels(folder: Path) -> list[Path]:
    """The wheels in `folder` whose package is not installed here or is older; never torch and its kin."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        from packaging.version import Version
    except ImportError:  # without packaging: any other version counts as lacking
        Version = None
    lacking = []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version = wheel_distribution(wheel)
        if name.startswith(NEVER_INSTALLED):
            continue
        try:
            have = installed_version(name)
        except PackageNotFoundError:
            lacking.append(wheel)
            continue
        if (Version(have) < Version(version)) if Version else have != version:
            lacking.append(wheel)
    return lacking


def install_and_rerun(folder: Path, target: Path) -> None:
    """Installs what the machine lacks from `folder` into `target` (no index, no dependencies), then replaces this
    process with the same command, `target` first on its path. Returns when nothing is lacking."""
    wheels = lacking_wheels(folder)
    if not wheels:
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(PROJECT), os.environ.get("PYTHONPATH", "")]),
                       **{INSTALLED_ENV: json.dumps([w.name for w in wheels])})
    os.execve(sys.executable, [sys.executable, *sys.argv], environment)


def machine() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
             "installed_from_wheels": json.loads(os.environ.get(INSTALLED_ENV, "[]"))}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        facts["memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    for package in ("transformers", "accelerate", "peft", "datasets"):
        facts[package] = __import__(package).__version__
    return facts


class Probe:
    """Runs the parts in order, each guarded: its figures or its error, printed as one JSON line when done."""

    def __init__(self, budget_s: float):
        self.started, self.budget_s, self.figures = time.perf_counter(), budget_s, {}

    def part(self, name: str, measure, *args, **kwargs):
        elapsed = time.perf_counter() - self.started
        if elapsed > self.budget_s:
            self.figures[name] = {"skipped": f"the time budget ({self.budget_s:.0f} s) was spent"}
        else:
            began = time.perf_counter()
            try:
                self.figures[name] = measure(*args, **kwargs)
            except Exception as error:  # one part's failure is a finding; the others still run
                self.figures[name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:],
                                      "passed": False}
            if isinstance(self.figures[name], dict):
                self.figures[name]["part_s"] = time.perf_counter() - began
        print(json.dumps({name: self.figures[name]}), flush=True)
        return self.figures[name]


def run_probe(dry_run: bool, root: Path, budget_s: float) -> dict:
    import torch

    from benchmarks import probe_parts as parts
    from benchmarks.estimates import projected_minutes
    from loop.config.checks import bitsandbytes_problem

    gpu = torch.cuda.is_available() and not dry_run
    if dry_run:  # a tiny model: a second thread only adds synchronisation (and on a busy CPU, spinning)
        torch.set_num_threads(1)
    shape = parts.SHAPES["dry-run" if dry_run else "whisper-small"]
    fp16 = "fp16" if gpu else "no"  # fp16 needs a GPU; the dry run takes the same path in float32
    steps = (shape.warmup_steps, shape.timed_steps)
    probe = Probe(budget_s)
    probe.figures["machine"] = machine()
    probe.figures["machine"]["dry_run"] = dry_run
    probe.part("workspace", parts.build_workspace, shape, root)
    peak = probe.part("gemm", parts.gemm_peak_tflops, 8192 if gpu else 512)
    peak_tflops = peak.get("tflops") or float("nan")

    def config(name, precision, *overrides):
        return parts.probe_config(shape, root, name, precision, *overrides)

    workers = 4 if gpu else 2  # the presets' DataLoader workers; the CPU has 2 cores
    speed = {}
    for precision in (fp16, "bf16"):
        for window in ("full", "dynamic"):
            label = f"{'fp16' if precision == fp16 else precision}_{window}"
            speed[label] = probe.part(f"speed_{label}", parts.time_training,
                                      config(label, precision, f"--model.encoder_window={window}",
                                             f"--train.dataloader_num_workers={workers}"),
                                      peak_tflops, steps, evaluate_too=precision == fp16)
    # The default, 0 workers, at the dynamic window (the shortest steps, where loading shows most)
    probe.part("speed_fp16_dynamic_no_workers", parts.time_training,
               config("no-workers", fp16, "--model.encoder_window=dynamic"), peak_tflops, steps)
    probe.part("nonfinite", parts.nonfinite_steps,
               config("nonfinite", fp16, "--train.gradient_accumulation_steps=1"))
    probe.part("lora", parts.lora_round_trip, config("lora", fp16, *one_step("--model.lora=true")))
    qlora_problem = bitsandbytes_problem("model.quantization", "4bit")
    if qlora_problem:
        probe.figures["qlora"] = {"skipped": qlora_problem}
        print(json.dumps({"qlora": probe.figures["qlora"]}), flush=True)
    else:
        probe.part("qlora", parts.lora_round_trip,
                   config("qlora", "bf16", *one_step("--model.lora=true", "--model.quantization=4bit")))
    launch = (["-m", "accelerate.commands.launch", "--config_file", str(PROJECT / "accelerate_configs" / "fsdp.yaml"),
               "--num_processes=1", "--mixed_precision=bf16"] if gpu else [])
    probe.part("fsdp", parts.fsdp_one_process,
               config("fsdp", "bf16", "--train.max_steps=4", "--train.save_steps=2", "--eval.eval_steps=4",
                      "--data.max_eval_samples=8", "--train.logging_steps=1"), launch, 300)
    probe.part("resume", parts.resume_matches,
               lambda name: config(f"resume-{name}", fp16, "--train.max_steps=4", "--train.save_steps=2",
                                   "--eval.eval_steps=4", "--data.max_eval_samples=8", "--train.deterministic=true"))
    if gpu:  # last, the longest (minutes of compiling); on a CPU inductor builds C++ for longer: left out there
        probe.part("compile", parts.time_training,
                   config("compile", fp16, "--model.encoder_window=full", f"--train.dataloader_num_workers={workers}",
                          "--train.torch_compile=true"), peak_tflops, steps)
    probe.figures["projection"] = {
        recipe: projected_minutes(speed[label], windows_at_the_end=windows)
        for recipe, label, windows in (("whisper-small-hi", "fp16_full", 1), ("whisper-small-hi-fast", "fp16_dynamic", 2))
        if "samples_per_s" in speed.get(label, {}) and "eval_utterances_per_s" in speed[label]
    }
    print(json.dumps({"projection": probe.figures["projection"]}), flush=True)
    probe.figures["total_s"] = time.perf_counter() - probe.started
    return probe.figures


def one_step(*overrides: str) -> list[str]:
    return ["--train.max_steps=1", "--train.save_steps=1", "--eval.eval_steps=1", "--data.max_eval_samples=8",
            *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks that every part runs")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install what this machine lacks from")
    parser.add_argument("--output", type=Path, help="write all figures as one JSON file here too")
    parser.add_argument("--workdir", type=Path, help="where the model, clips and runs go (default: a temporary folder)")
    parser.add_argument("--budget_s", type=float, default=420.0, help="start no part after this many seconds")
    args = parser.parse_args(argv)
    if args.wheels is not None and INSTALLED_ENV not in os.environ:
        install_and_rerun(args.wheels, Path(tempfile.gettempdir()) / "gpu-probe-site")
    sys.path.insert(0, str(PROJECT))  # run as a file from a fresh checkout, without pip install -e .
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="gpu-probe-") as scratch:
        root = args.workdir or Path(scratch)
        figures = run_probe(args.dry_run, root, args.budget_s)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=1))
    failed = [name for name, part in figures.items() if isinstance(part, dict) and part.get("passed") is False]
    print(json.dumps({"failed_parts": failed, "total_s": figures["total_s"]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
