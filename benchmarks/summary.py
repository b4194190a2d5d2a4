"""From the children's figures to the report: medians over repeats, ours / reference ratios, FLOPs and MFU, the
machine's facts, and the printed table."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch
from transformers import WhisperConfig

from benchmarks.estimates import parameter_count, training_flops_per_sample
from benchmarks.settings import BenchSettings
from benchmarks.workspace import DYNAMIC, PACKED, SIDES

RECIPE_SAMPLES = 4000 * 16  # the reference recipe's training: 4000 optimizer steps of batch 16
from loop.results import package_versions


def machine_facts() -> dict:
    """{"machine": CPU, cores, torch threads, device, CUDA, platform; "versions": the packages'}."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({cpu})",
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }
    return {"machine": facts, "versions": package_versions()}


def median_figures(runs: list[dict]) -> dict:
    """Median over repeats of every numeric figure, phase by phase."""
    merged: dict[str, dict] = {}
    for phase in runs[0]:
        keys = [k for k, v in runs[0][phase].items() if isinstance(v, (int, float)) and v is not None]
        merged[phase] = {k: statistics.median(r[phase][k] for r in runs) for k in keys}
    return merged


def same_transcripts(ours: dict[str, str], reference: dict[str, str]) -> float:
    """The fraction of our clips (id -> hypothesis) for which the reference decoded the same text."""
    return sum(reference.get(i) == h for i, h in ours.items()) / max(1, len(ours))


def summarize(runs: dict[str, list[dict]], settings: BenchSettings, model_dir: Path) -> dict:
    """Medians of each side (and of the packed runs), ratios ours / reference, FLOPs, agreement of the
    transcripts, and the raw figures of every repeat (without the transcripts)."""
    ours, reference = median_figures(runs["loop"]), median_figures(runs["reference"])
    ratio = lambda phase, key: ours[phase][key] / reference[phase][key]  # noqa: E731
    ratios = {
        "train_samples_per_second": ratio("train", "samples_per_second"),
        "eval_utterances_per_second": ratio("eval", "utterances_per_second"),
        "prep_clips_per_second": ratio("prep", "clips_per_second"),
        "cache_bytes_per_clip": ratio("prep", "cache_bytes_per_clip"),
        "train_audio_seconds_per_second": ratio("train", "audio_seconds_per_second"),
        "train_peak_rss": ratio("train", "peak_rss_mb"),
        "eval_peak_rss": ratio("eval", "peak_rss_mb"),
    }
    packed = median_figures(runs[PACKED]) if runs.get(PACKED) else None
    if packed:  # utterances, not rows: the reference's rows are one utterance each
        ratios["train_utterances_per_second_packed"] = (packed["train"]["utterances_per_second"]
                                                        / reference["train"]["samples_per_second"])
    dynamic = median_figures(runs[DYNAMIC]) if runs.get(DYNAMIC) else None
    if dynamic:
        ratios["train_samples_per_second_dynamic"] = (dynamic["train"]["samples_per_second"]
                                                      / reference["train"]["samples_per_second"])
        ratios["eval_utterances_per_second_dynamic"] = (dynamic["eval"]["utterances_per_second"]
                                                        / reference["eval"]["utterances_per_second"])
        ratios["same_transcripts_fraction_dynamic"] = statistics.fmean(
            same_transcripts(d["eval"]["hypotheses"], r["eval"]["hypotheses"])
            for d, r in zip(runs[DYNAMIC], runs["reference"]))
        for r in runs[DYNAMIC]:
            r["eval"].pop("hypotheses", None)
    if "cuda_peak_gb" in ours["train"]:
        ratios["train_cuda_peak_memory"] = ratio("train", "cuda_peak_gb")
        ratios["eval_cuda_peak_memory"] = ratio("eval", "cuda_peak_gb")
    config = WhisperConfig.from_pretrained(model_dir)
    flops = {}
    for side, figures in (("loop", ours), ("reference", reference)):
        per_sample = training_flops_per_sample(config, figures["train"]["label_tokens"])
        achieved = per_sample * figures["train"]["samples_per_second"]
        flops[side] = {"training_flops_per_sample": per_sample, "achieved_tflops": achieved / 1e12}
        if "cuda_peak_gb" in figures["train"]:
            flops[side]["mfu"] = achieved / (settings.peak_tflops * 1e12)
    agree = [same_transcripts(o["eval"]["hypotheses"], r["eval"]["hypotheses"])
             for o, r in zip(runs["loop"], runs["reference"])]
    for side in SIDES:  # the transcripts were only needed for the comparison
        for r in runs[side]:
            r["eval"].pop("hypotheses", None)
    # The recipe's whole training (4000 steps of 16 samples) at each measured rate, in minutes.
    trained = {"ours": ours, "reference": reference, **({DYNAMIC: dynamic} if dynamic else {})}
    recipe_minutes = {name: RECIPE_SAMPLES / figures["train"]["samples_per_second"] / 60
                      for name, figures in trained.items()}
    return {
        "ratios": ratios,
        "recipe_minutes": recipe_minutes,
        "loop": ours,
        "reference": reference,
        **({PACKED: packed} if packed else {}),
        **({DYNAMIC: dynamic} if dynamic else {}),
        "flops": flops,
        "same_transcripts_fraction": statistics.fmean(agree) if agree else None,
        "raw": runs,
        "parameters": parameter_count(config),
    }


def format_report(report: dict) -> str:
    """The printed summary: machine and settings, FLOPs, the ours / reference table, the memory estimate."""
    s, m = report["settings"], report["machine"]
    ours, ref, r = report["loop"], report["reference"], report["ratios"]
    lines = [
        f"machine: {m['device']}, {m['cpus_usable']} CPUs, {m['torch_threads']} torch threads; load average "
        f"{report['load_average']['before'][0]:.2f} before, {report['load_average']['after'][0]:.2f} after",
        f"shape {s['shape']}, precision {s['precision']}, train batch {s['train_batch_size']} x "
        f"{s['timed_steps']} timed steps (+{s['warmup_steps']} warm-up), {s['train_clips']} clips prepared, "
        f"{s['eval_clips']} decoded to at most {s['generation_max_length']} tokens (eval batch ours "
        f"{s['eval_batch_size']}, reference {s['reference_eval_batch_size']}), medians of {s['repeats']} repeat(s)",
    ]
    rows = [
        ("data preparation, clips/s", "prep", "clips_per_second", "prep_clips_per_second"),
        ("prepared cache, kB per clip", "prep", "cache_bytes_per_clip", "cache_bytes_per_clip"),
        ("training, samples/s", "train", "samples_per_second", "train_samples_per_second"),
        ("training, audio s/s", "train", "audio_seconds_per_second", "train_audio_seconds_per_second"),
        ("evaluation, utterances/s", "eval", "utterances_per_second", "eval_utterances_per_second"),
        ("peak RSS in training, MB", "train", "peak_rss_mb", "train_peak_rss"),
        ("peak RSS in evaluation, MB", "eval", "peak_rss_mb", "eval_peak_rss"),
    ]
    if "train_cuda_peak_memory" in r:
        rows += [("peak CUDA memory in training, GB", "train", "cuda_peak_gb", "train_cuda_peak_memory"),
                 ("peak CUDA memory in evaluation, GB", "eval", "cuda_peak_gb", "eval_cuda_peak_memory")]
    for side in SIDES:
        f = report["flops"][side]
        extra = f", MFU {100 * f['mfu']:.1f}% of {s['peak_tflops']:g} TFLOP/s" if "mfu" in f else ""
        lines.append(f"{side}: {f['training_flops_per_sample'] / 1e9:.1f} GFLOP per training sample, "
                     f"{f['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved{extra}")
    lines.append(f"{'':34}{'ours':>12}{'reference':>12}{'ratio':>9}")
    unit = {"cache_bytes_per_clip": 1e3}  # shown in kB
    lines += [f"{name:34}{ours[phase][key] / unit.get(key, 1):12.3f}{ref[phase][key] / unit.get(key, 1):12.3f}"
              f"{r[ratio]:8.2f}x" for name, phase, key, ratio in rows]
    if PACKED in report:
        packed = report[PACKED]["train"]
        lines.append(
            f"{'training, utterances/s, packed rows':34}{packed['utterances_per_second']:12.3f}"
            f"{ref['train']['samples_per_second']:12.3f}{r['train_utterances_per_second_packed']:8.2f}x"
            f"   ({packed['samples_per_second']:.3f} rows/s of "
            f"{packed['utterances_per_second'] / packed['samples_per_second']:.1f} utterances, "
            f"{packed['label_tokens']:.0f} label tokens; peak RSS {packed['peak_rss_mb']:.0f} MB)")
    if DYNAMIC in report:
        dynamic = report[DYNAMIC]
        lines.append(f"{'training, samples/s, dynamic window':34}{dynamic['train']['samples_per_second']:12.3f}"
                     f"{ref['train']['samples_per_second']:12.3f}{r['train_samples_per_second_dynamic']:8.2f}x"
                     f"   (peak RSS {dynamic['train']['peak_rss_mb']:.0f} MB)")
        lines.append(f"{'evaluation, utt/s, dynamic window':34}{dynamic['eval']['utterances_per_second']:12.3f}"
                     f"{ref['eval']['utterances_per_second']:12.3f}{r['eval_utterances_per_second_dynamic']:8.2f}x"
                     f"   (same transcripts as the reference: {100 * r['same_transcripts_fraction_dynamic']:.0f}%)")
    lines.append(f"same transcripts on both sides: {100 * report['same_transcripts_fraction']:.0f}%")
    projected = report["recipe_minutes"]
    lines.append("the recipe's 4000 x 16 training samples at these rates: " + ", ".join(
        f"{name} {minutes:.1f} min" for name, minutes in projected.items()) + " (evaluation not included)")
    est = report["memory_estimate_whisper_small_hi"]
    preset, recipe = est["preset_gb"], est["batch_16_gb"]
    lines.append(
        f"memory estimate, whisper-small ({preset['parameters'] / 1e6:.1f}M parameters, fp16 autocast, "
        f"{est['label_tokens']} label tokens): the whisper-small-hi preset (micro-batch {est['preset_micro_batch']} x "
        f"{est['preset_accumulation']}) {preset['total']:.1f} GB (states {est['states_gb']:.1f}, encoder activations "
        f"{preset['encoder_activations']:.1f}, decoder {preset['decoder_activations']:.1f}, logits "
        f"{preset['logits_and_loss']:.1f}); one batch of 16 {recipe['total']:.1f} GB; the reference recipe needs "
        f"{est['reference_recipe_gb']} GB"
    )
    return "\n".join(lines)
