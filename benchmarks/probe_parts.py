"""The measurements of benchmarks/gpu_probe.py: a whisper-small-shaped model with Whisper's real vocabulary, clips
with Common Voice Hindi's durations, and the loop's own `setup()`, `optimizer_step`, `fit()`, `evaluate` and saves.

Nothing of the loop is replaced: variants go in as configuration (`--section.key=value`), faults as torch hooks on
the model (a NaN in the logits, an inf in one gradient), the timed batches through the `batches` iterator that
`optimizer_step` takes.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.estimates import training_flops_per_sample
from loop.config import to_dict
from loop.config.loading import load_config
from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split, write_manifest
from loop.model.tiny import build_tiny_whisper
from loop.train_log import WaitClock

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
WHISPER_VOCAB = 51865  # the multilingual checkpoints' vocabulary (tiny ... large-v2): logits, loss and embedding
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ProbeShape:
    """The model and the amounts of one probe run."""

    d_model: int
    layers: int
    heads: int
    chunk_length_s: int
    max_target_positions: int
    batch: int
    """Per-device batch; the recipe's 8, with `accumulation` 2: 16 samples a step."""
    accumulation: int
    warmup_steps: int
    timed_steps: int
    train_clips: int
    eval_clips: int
    mean_duration_s: float
    """Mean clip length: Common Voice Hindi's is about 5 s."""
    words_per_second: float
    """Transcript words per second of speech (read speech, about 2.2)."""
    generation_max_length: int
    """Tokens a random model decodes to (it never stops by itself): about a fine-tuned model's on such clips."""


SHAPES = {
    "whisper-small": ProbeShape(768, 12, 12, 30, 448, batch=8, accumulation=2, warmup_steps=3, timed_steps=12,
                                train_clips=256, eval_clips=64, mean_duration_s=5.0, words_per_second=2.2,
                                generation_max_length=64),
    # --dry-run: the same code on a CPU in about a minute
    "dry-run": ProbeShape(64, 2, 2, 5, 128, batch=2, accumulation=2, warmup_steps=1, timed_steps=1, train_clips=16,
                          eval_clips=4, mean_duration_s=2.0, words_per_second=2.2, generation_max_length=8),
}


def synchronize() -> None:
    torch.cuda.synchronize() if torch.cuda.is_available() else None


def gemm_peak_tflops(size: int, repeats: int = 10) -> dict:
    """A (size x size) @ (size x size) matrix product, bf16 on a GPU (float32 on a CPU), after 3 warm-ups: the
    machine's measured peak, what MFU divides by (an H100's datasheet says 989 dense; 8k products measure ~800)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    seconds = (time.perf_counter() - started) / repeats
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / seconds / 1e12}


def clip_durations(shape: ProbeShape, count: int, seed: int) -> list[float]:
    """Gamma-distributed durations with the shape's mean (standard deviation a third of it), 1 s to the window."""
    rng = np.random.default_rng(seed)
    drawn = rng.gamma(9.0, shape.mean_duration_s / 9.0, size=count)
    return [float(np.clip(d, 1.0, shape.chunk_length_s - 0.5)) for d in drawn]


def synthetic_clip(path: Path, seconds: float, rng) -> None:
    """A WAV of tones and noise (the speed of training does not depend on what is said)."""
    import soundfile

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tones = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(120, 900, size=3))
    audio = 0.1 * tones / 3 + 0.02 * rng.standard_normal(len(t))
    soundfile.write(path, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def build_workspace(shape: ProbeShape, root: Path, seed: int = 0) -> dict:
    """Model folder, clips and manifests under `root`: a random-init Whisper of the shape with the corpus-trained
    tokenizer and Whisper's full vocabulary size (ids past the tokenizer's suppressed in generation), training and
    evaluation clips of Common-Voice-like durations whose transcripts are corpus words at `words_per_second`."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    folder = find_common_voice_dir(str(CORPUS))
    sentences = [row["text"] for split in ("train", "dev") for row in read_common_voice_split(folder, split, SkipLog())]
    model_dir = root / "model"
    build_tiny_whisper(sentences, model_dir, vocab_size=400, chunk_length_s=shape.chunk_length_s,
                       d_model=shape.d_model, layers=shape.layers, heads=shape.heads,
                       max_target_positions=shape.max_target_positions, seed=seed)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    tokenizer_size = model.config.vocab_size
    model.resize_token_embeddings(WHISPER_VOCAB, mean_resizing=False)
    model.save_pretrained(model_dir)
    generation = GenerationConfig.from_pretrained(model_dir)
    # A random model would emit timestamps and ids the tokenizer does not have: one segment of plain text.
    generation.suppress_tokens = list(range(generation.no_timestamps_token_id + 1, WHISPER_VOCAB))
    generation.save_pretrained(model_dir)
    words = " ".join(sentences).split()
    rng = np.random.default_rng(seed)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    facts = {}
    for split, count in (("train", shape.train_clips), ("eval", shape.eval_clips)):
        rows, durations = [], clip_durations(shape, count, seed + len(split))
        facts[f"{split}_clips"], facts[f"{split}_mean_duration_s"] = count, statistics.fmean(durations)
        for number, seconds in enumerate(durations):
            path = root / "clips" / f"{split}-{number}.wav"
            synthetic_clip(path, seconds, rng)
            text = " ".join(rng.choice(words, size=max(1, round(seconds * shape.words_per_second))))
            rows.append({"audio_path": str(path), "text": text, "client_id": f"speaker-{number % 16}"})
        write_manifest(root / "manifests" / f"{split}.csv", rows)
    return {"tokenizer_size": tokenizer_size, "vocab_size": WHISPER_VOCAB,
            "parameters": sum(p.numel() for p in model.parameters()), **facts}


def probe_config(shape: ProbeShape, root: Path, name: str, precision: str, *overrides: str):
    """The loop's configuration for one probe run in `root/runs/name`: the recipe's batch and accumulation, the
    eval clips as the selection split, nothing logged; `overrides` as on the command line."""
    return load_config(None, [
        f"--model.name_or_path={root / 'model'}", "--model.language=hindi", "--model.task=transcribe",
        "--data.source=manifest", f"--data.path={root / 'manifests'}", "--data.train_splits=train",
        "--data.eval_split=eval", "--eval.select_on=test", f"--data.cache_dir={root / 'cache'}", "--data.num_proc=4",
        f"--train.per_device_train_batch_size={shape.batch}",
        f"--train.gradient_accumulation_steps={shape.accumulation}", "--train.learning_rate=1e-5",
        "--train.warmup_steps=0", f"--train.mixed_precision={precision}", "--train.report_to=none",
        "--eval.eval_on_start=false", "--eval.guard_sets=[]", "--eval.per_device_eval_batch_size=32",
        f"--eval.generation_max_length={shape.generation_max_length}", *overrides,
    ], str(root / "runs" / name))


def release() -> None:
    """Frees what the last run left (the caller dropped it first) and Accelerate's state (each run builds its own
    Accelerator), and starts the peak memory count afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class RecordedBatches:
    """The training batches `optimizer_step` takes, with each one's audio width (samples) and label width
    recorded: the FLOPs of the step follow from them."""

    def __init__(self, batches):
        self.batches, self.shapes = batches, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.shapes.append((len(batch["index"]), batch["audio"].shape[1], batch["labels"].shape[1]))
        return batch


def batch_windows(model_config, log_mel, window: str, shapes) -> list[int]:
    """Encoder input frames of each recorded micro-batch at the model's window."""
    from loop.model.encoder_window import full_window_frames, window_frames

    full = full_window_frames(model_config)
    if window == "full":
        return [full] * len(shapes)
    return [window_frames([samples], log_mel.hop_length, 1.0, log_mel.sampling_rate, full) for _, samples, _ in shapes]


def batch_flops(model_config, frames: list[int], shapes) -> float:
    """Training FLOPs of the recorded micro-batches (`training_flops_per_sample` at each batch's encoder positions
    and padded label length)."""
    total = 0.0
    for window, (rows, _, labels) in zip(frames, shapes):
        config = model_config.__class__(**{**model_config.to_dict(), "max_source_positions": window // 2})
        total += rows * training_flops_per_sample(config, labels)
    return total


def time_training(config, peak_tflops: float, steps: tuple[int, int], *, evaluate_too: bool = False) -> dict:
    """`setup()`, warm-up steps, then timed `optimizer_step`s: samples/s, MFU against the measured peak, peak
    memory, the share of the step spent waiting for data; with `evaluate_too`, the selection evaluation's
    utterances/s and the seconds of a checkpoint save and a best/ write. Returns the figures."""
    from loop.eval.evaluation import evaluate
    from loop.run.best_model import write_best_model
    from loop.run.checkpoints import save_checkpoint
    from loop.train import endless_batches, optimizer_step, setup

    shape_steps = steps  # (warm-up, timed)
    release()
    started = time.perf_counter()
    run = setup(config)
    setup_s = time.perf_counter() - started
    batches = WaitClock(RecordedBatches(endless_batches(run)))
    first = time.perf_counter()
    for _ in range(shape_steps[0]):
        optimizer_step(run, batches)
    synchronize()
    first_steps_s = time.perf_counter() - first
    recorded = batches.batches
    recorded.shapes.clear()
    waited, samples = batches.seconds, 0
    started = time.perf_counter()
    for _ in range(shape_steps[1]):
        samples += optimizer_step(run, batches).samples
    synchronize()
    seconds = time.perf_counter() - started
    model_config = run.accelerator.unwrap_model(run.model).config
    frames = batch_windows(model_config, run.log_mel, config.model.encoder_window, recorded.shapes)
    flops = batch_flops(model_config, frames, recorded.shapes)
    figures = {
        "setup_s": setup_s, "warmup_steps_s": first_steps_s, "timed_steps": shape_steps[1],
        "samples_per_s": samples / seconds, "step_s": seconds / shape_steps[1],
        "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak_tflops,
        "data_wait_share": (batches.seconds - waited) / seconds,
        "mean_label_tokens": statistics.fmean(labels for _, _, labels in recorded.shapes),
        "mean_window_s": statistics.fmean(frames) * run.log_mel.hop_length / run.log_mel.sampling_rate,
        "nonfinite_steps": run.state.nonfinite_steps,
    }
    if torch.cuda.is_available():
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if evaluate_too:
        started = time.perf_counter()
        result = evaluate(run.model, run.selection_loader, run.accelerator, run.processor.tokenizer,
                          run.data.selection["text"], config.model.language, log_mel=run.log_mel)
        synchronize()
        figures["eval_utterances_per_s"] = result.metrics["num_utterances"] / (time.perf_counter() - started)
        figures["eval_failed"] = result.metrics["num_failed"]
        started = time.perf_counter()
        run.state.step = 1
        save_checkpoint(run.accelerator, config.output_dir, run.state, to_dict(config), keep=2)
        figures["checkpoint_save_s"] = time.perf_counter() - started
        started = time.perf_counter()
        write_best_model(run.accelerator, run.model, run.processor, config.output_dir)
        figures["best_save_s"] = time.perf_counter() - started
    del run, batches, recorded  # the batch generator holds the run too
    release()
    return figures


def spoil_logits(model, step: int, factor: float):
    """Multiplies the logits of training forward pass `step` (from 1) by `factor`: a real non-finite loss."""
    passes = itertools.count(1)

    def hook(module, inputs, logits):
        if torch.is_grad_enabled() and next(passes) == step:
            return logits * factor

    return model.get_output_embeddings().register_forward_hook(hook)


def spoil_gradient(parameter, step: int):
    """An inf in `parameter`'s gradient in backward pass `step` (from 1), the loss finite: an fp16 overflow."""
    passes = itertools.count(1)
    return parameter.register_hook(lambda grad: grad * math.inf if next(passes) == step else grad)


def nonfinite_steps(config) -> dict:
    """6 steps (one micro-batch each), an overflowing gradient in step 2 and a NaN loss in step 4: both skipped by
    the GradScaler (fp16) or the loop, the schedule held, training on after them with finite weights."""
    from loop.train import endless_batches, optimizer_step, setup

    run = setup(config)
    scaler = run.accelerator.scaler
    scale_before = scaler.get_scale() if scaler is not None else None
    spoil_gradient(run.model.get_encoder().conv1.weight, 2)
    spoil_logits(run.model, 4, float("nan"))
    batches = endless_batches(run)
    losses = [float(optimizer_step(run, batches).loss_sum) for _ in range(6)]
    figures = {
        "losses": losses, "nonfinite_steps": run.state.nonfinite_steps,
        "scheduler_steps": run.scheduler.scheduler.last_epoch,
        "scale_before": scale_before, "scale_after": scaler.get_scale() if scaler is not None else None,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in run.model.parameters()),
    }
    # A random-init model in fp16 may overflow by itself too: every skip must be one the scaler halved its scale
    # for, with the schedule held, the two forced ones among them.
    skipped = figures["nonfinite_steps"]
    halvings = None if scaler is None else round(math.log2(figures["scale_before"] / figures["scale_after"]))
    figures["passed"] = (skipped >= 2 and figures["scheduler_steps"] == 6 - skipped and halvings in (None, skipped)
                         and math.isnan(losses[3]) and figures["weights_finite"] and math.isfinite(losses[-1]))
    del run, batches, scaler  # the batch generator holds the run too
    release()
    return figures


class StopAt:
    """A SIGTERM that arrives once the run has taken `step` steps (what `fit()` checks between steps)."""

    def __init__(self, run, step: int):
        self.run, self.step = run, step

    @property
    def signal_name(self) -> str:
        return "SIGTERM" if self.run.state.step >= self.step else ""


def resume_matches(make_config) -> dict:
    """4 steps straight against 2, a stop, and 2 more after `--train.resume=true`, through `fit()` with
    `train.deterministic`: the largest weight difference (0 when bitwise equal)."""
    from loop.train import fit, setup

    def weights(run):
        return {k: v.detach().float().cpu().clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}

    run = setup(make_config("straight"))
    fit(run)
    straight = weights(run)
    del run
    release()
    run = setup(make_config("resumed"))
    stopped = fit(run, StopAt(run, 2))
    del run
    release()
    config = make_config("resumed")
    config.train.resume = True
    run = setup(config)
    resumed_from = run.state.step
    fit(run)
    resumed = weights(run)
    del run
    release()
    torch.use_deterministic_algorithms(False)  # train.deterministic is for the rest of a process: the probe goes on
    difference = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    return {"stopped": stopped, "resumed_from": resumed_from, "max_weight_difference": difference,
            "bitwise_equal": difference == 0.0}


def lora_round_trip(config) -> dict:
    """One LoRA step through `fit()` (evaluation, an adapter-only checkpoint and a merged best/), then a resume from
    that checkpoint: the adapter weights come back equal, best/ loads as a plain Whisper."""
    from peft import get_peft_model_state_dict

    from loop.model.loading import load_for_inference
    from loop.train import fit, setup

    started = time.perf_counter()
    run = setup(config)
    fit(run)
    saved = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(run.model).items()}
    del run
    release()
    config.train.resume = True
    run = setup(config)
    loaded = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(run.model).items()}
    equal = run.state.step == 1 and saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    del run
    release()
    best, _ = load_for_inference(str(Path(config.output_dir) / "best"))
    return {"adapter_round_trip_equal": equal, "best_loads": type(best).__name__,
            "seconds": time.perf_counter() - started, "passed": bool(equal)}


def fsdp_one_process(config, launch: list[str], timeout_s: float) -> dict:
    """`scripts/train.py` under `launch` (on a GPU: accelerate launch with accelerate_configs/fsdp.yaml, one
    process) through a save and `finish()`: results.json counts every test utterance and best/ loads."""
    import subprocess
    import sys

    from loop.files import write_json_atomic

    config_file = Path(config.output_dir).parent / "fsdp-config.json"
    write_json_atomic(config_file, to_dict(config))
    command = [sys.executable, *launch, str(PROJECT / "scripts" / "train.py"), "--config", str(config_file)]
    # The checkout's loop first (a fresh checkout is not installed), then whatever the probe's own path holds.
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS=str(torch.get_num_threads()))  # as many threads as this process uses
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT, env=environment)
    figures = {"returncode": done.returncode, "seconds": time.perf_counter() - started, "command": command[1:]}
    results = Path(config.output_dir) / "results.json"
    if done.returncode != 0 or not results.is_file():
        figures["error"] = (done.stdout + done.stderr)[-3000:]
        figures["passed"] = False
        return figures
    written = json.loads(results.read_text())
    figures.update(test_utterances=written.get("test_utterances"), steps=written.get("steps"),
                   best_exists=(Path(config.output_dir) / "best" / "model.safetensors").is_file())
    figures["passed"] = figures["best_exists"] and bool(written.get("test_utterances"))
    return figures
