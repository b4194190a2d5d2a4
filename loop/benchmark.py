"""The loop against the classic `Seq2SeqTrainer` recipe, measured in one invocation on one machine.

    python scripts/benchmark.py --shape tiny --repeats 3 --output bench.json     # CPU, whisper-tiny shapes
    python scripts/benchmark.py --shape small --output bench.json                # GPU, whisper-small shapes

Both sides get the same random-init model (one `save_pretrained` folder), the same clips of the shipped synthetic
corpus, batch size, precision and step counts. Each (side, repeat) runs in a fresh Python process, in the order
loop, reference, loop, reference, ..., so machine drift hits both sides and each process's peak memory is its own.
Figures are medians over the repeats; ratios are ours / reference.

Timed, on each side:
- data preparation, clips/s: the training clips -> a prepared Arrow table (decode, log-mel, tokenize, write).
  Ours: `loop.data.prepare` (batched map). Reference: the blog's `prepare_dataset`, one example per call, on the
  feature extractor's NumPy STFT. Both decode with `loop.audio.decode_audio` (the blog's datasets `Audio` column
  would decode the same MP3s with FFmpeg, which is not installed here).
- training, samples/s: `timed_steps` optimizer steps after `warmup_steps`, data loading included. Ours:
  `loop.train.setup()`, then `loop.train.optimizer_step`, the function `fit()` runs once per step. Reference:
  `Seq2SeqTrainer.train()`, timed between step ends by a callback.
- evaluation, utterances/s: the eval clips decoded greedily to the same max length from the same (initial)
  weights. Ours: `loop.evaluation.evaluate` over the longest-first loader at the larger eval batch. Reference:
  `trainer.predict` with `predict_with_generate` at the blog's eval batch, with the blog's WER `compute_metrics`.
  Both also compute the eval loss, as both recipes do.
- training with packed rows, utterances/s (ours only, `--packing`, a third process per repeat): the same steps on
  rows that each join consecutive clips up to the audio window (`data.pack_to_seconds`), against the reference's
  one utterance per row. Same model, batch of rows and step count; more utterances (and label tokens) per row.

The model is random: left alone it emits timestamp tokens, after which transformers' Whisper `generate` decodes
further "segments" past `max_length`. The benchmark model's generation config suppresses timestamp tokens, so both
sides decode one segment of at most `generation_max_length` tokens; the report checks that they produced the same
transcripts.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import csv
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import (  # the Trainer's modules are imported where used: they take seconds, and our side never needs them
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

import loop.data
import loop.evaluation
import loop.train
from loop.audio import SAMPLE_RATE, decode_audio
from loop.checkpointing import LoopState
from loop.collator import SpeechSeq2SeqCollator
from loop.config import load_config, preset_path
from loop.data import Rows, SplitReport, build_datasets, longest_first, prepare
from loop.evaluation import evaluate, generate_ids
from loop.features import log_mel_features
from loop.model import load_model, load_processor
from loop.results import package_versions
from loop.sources import (
    SkipLog,
    find_common_voice_dir,
    load_utterances,
    read_common_voice_split,
)
from loop.tiny_model import build_tiny_whisper
from loop.train import endless_batches, get_dataloaders, optimizer_step, setup

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
BPE_VOCAB_SIZE = 400  # regular tokens of the corpus-trained tokenizer, as in assets/tiny-whisper-hi
REFERENCE_MEMORY_GB = 15.8  # what the reference recipe needs to train whisper-small, batch 16, fp16 (the figure)
H100_DENSE_TFLOPS = 989.0  # H100 SXM, bf16/fp16 dense tensor-core peak
LANGUAGE, TASK = "hindi", "transcribe"
SIDES = ("loop", "reference")
PACKED = "packed"  # our training on packed rows: an extra process per repeat, not a side of the comparison


@dataclass(frozen=True)
class Shape:
    """A Whisper geometry and the step counts and sizes that suit it."""

    d_model: int
    layers: int
    """Encoder layers, and as many decoder layers."""
    heads: int
    chunk_length_s: int
    """Audio window in seconds: the encoder sees chunk_length_s * 50 positions."""
    max_target_positions: int
    train_batch_size: int
    eval_batch_size: int
    """Ours: the larger generation batch of the loop's presets."""
    warmup_steps: int
    timed_steps: int
    train_clips: int
    eval_clips: int
    generation_max_length: int


SHAPES = {
    # seconds on a CPU; only checks that everything runs
    "test": Shape(64, 2, 2, 5, 128, train_batch_size=4, eval_batch_size=8, warmup_steps=1, timed_steps=1,
                  train_clips=8, eval_clips=4, generation_max_length=16),
    # whisper-tiny (its vocabulary aside), sized for a 2-core CPU: a step at batch 4 takes seconds there
    "tiny": Shape(384, 4, 6, 30, 448, train_batch_size=4, eval_batch_size=16, warmup_steps=1, timed_steps=3,
                  train_clips=32, eval_clips=16, generation_max_length=225),
    # whisper-small, the reference recipe's model and batch, for a GPU
    "small": Shape(768, 12, 12, 30, 448, train_batch_size=16, eval_batch_size=32, warmup_steps=4, timed_steps=16,
                   train_clips=320, eval_clips=64, generation_max_length=225),
}


@dataclass
class BenchSettings:
    """What to measure and how: the options of scripts/benchmark.py."""

    shape: str = "auto"
    """Model geometry and default sizes: `test`, `tiny` or `small` (see SHAPES); `auto` is small on a GPU, else tiny."""
    repeats: int = 3
    """Runs of each side, alternating loop, reference, loop, ...; figures are medians."""
    train_batch_size: int = 0
    """Training batch of both sides (0: the shape's)."""
    eval_batch_size: int = 0
    """Our generation batch (0: the shape's)."""
    reference_eval_batch_size: int = 8
    """The reference's generation batch (the blog's per_device_eval_batch_size)."""
    warmup_steps: int = 0
    """Untimed steps before the timed ones (0: the shape's)."""
    timed_steps: int = 0
    """Timed optimizer steps (0: the shape's)."""
    train_clips: int = 0
    """Clips prepared (timed) and trained on (0: the shape's)."""
    eval_clips: int = 0
    """Clips decoded in the evaluation (0: the shape's)."""
    generation_max_length: int = 0
    """Maximum decoded tokens, prompt included, on both sides (0: the shape's)."""
    precision: str = "auto"
    """`no`, `fp16` or `bf16` on both sides; `auto` is fp16 (the recipe's) on a GPU and `no` on a CPU."""
    learning_rate: float = 1e-5
    """Peak learning rate of both sides (the recipe's); it does not change the speed."""
    gradient_checkpointing: bool = False
    """On both sides. The blog turns it on; the loop's presets do not."""
    attn_implementation: str = "sdpa"
    """Attention kernel of both sides' models."""
    dataloader_num_workers: int = 0
    """Training DataLoader workers on both sides (both recipes default to 0)."""
    prep_num_proc: int = 1
    """`datasets.map` processes for data preparation, on both sides."""
    peak_tflops: float = H100_DENSE_TFLOPS
    """Accelerator peak for model FLOPs utilisation (GPU only)."""
    seed: int = 42
    quick: bool = False
    """The `test` shape, one repeat: checks that the benchmark runs, measures nothing."""
    fast_paths: bool = False
    """Instead of the comparison, A/B-test candidate fast paths of our side in one process."""
    packing: bool = True
    """Also time our training on rows packed to the audio window (utterances/s; one more process per repeat)."""
    output: str = ""
    """JSON file for the results."""
    work_dir: str = ""
    """Where model, manifests and prepared data go (default: a temporary folder, removed at the end)."""
    def resolved(self) -> "BenchSettings":
        """The settings with the shape's defaults filled in and `quick` applied."""
        settings = replace(self, shape="test", repeats=1) if self.quick else replace(self)
        if settings.shape == "auto":
            settings.shape = "small" if torch.cuda.is_available() else "tiny"
        shape = SHAPES.get(settings.shape)
        if shape is None:
            return settings
        for name in ("train_batch_size", "eval_batch_size", "warmup_steps", "timed_steps", "train_clips",
                     "eval_clips", "generation_max_length"):
            if not getattr(settings, name):
                setattr(settings, name, getattr(shape, name))
        if settings.precision == "auto":
            settings.precision = "fp16" if torch.cuda.is_available() else "no"
        return settings


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (for command-line help that cannot contradict the code)."""
    docs, previous = {}, None
    for node in ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = " ".join(str(node.value.value).split())
            previous = None
    return docs


def validate(settings: BenchSettings) -> list[str]:
    """Every problem with resolved settings."""
    problems = []
    if settings.shape not in SHAPES:
        problems.append(f"--shape must be one of {', '.join(SHAPES)}, got {settings.shape!r}")
    for name in ("repeats", "train_batch_size", "eval_batch_size", "reference_eval_batch_size", "warmup_steps",
                 "timed_steps", "train_clips", "eval_clips", "generation_max_length", "prep_num_proc"):
        if getattr(settings, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(settings, name)}")
    steps = settings.warmup_steps + settings.timed_steps
    if settings.train_clips < steps * settings.train_batch_size:
        problems.append(
            f"--train_clips {settings.train_clips} is less than (warmup_steps + timed_steps) x train_batch_size = "
            f"{steps * settings.train_batch_size}: an epoch boundary would fall inside the timed steps"
        )
    if settings.precision not in ("no", "fp16", "bf16"):
        problems.append(f"--precision must be auto, no, fp16 or bf16, got {settings.precision!r}")
    if settings.attn_implementation not in ("sdpa", "eager"):
        problems.append(f"--attn_implementation must be sdpa or eager, got {settings.attn_implementation!r}")
    shape = SHAPES.get(settings.shape)
    if shape and settings.generation_max_length > shape.max_target_positions:
        problems.append(f"--generation_max_length {settings.generation_max_length} is more than the "
                        f"{settings.shape} shape's {shape.max_target_positions} decoder positions")
    if settings.dataloader_num_workers < 0:
        problems.append(f"--dataloader_num_workers must be >= 0, got {settings.dataloader_num_workers}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Analytic FLOPs and memory


def training_flops_per_sample(config, n_label_tokens: float) -> float:
    """Matmul FLOPs to train on one example: 3 x the forward pass (the backward computes gradients for both the
    inputs and the weights of every matmul, 2 x the forward), except the first convolution, whose input (the
    log-mel features) needs no gradient: 2 x.

    Forward, with m mel bins, F input frames, S = F/2 encoder positions, T label tokens (decoder positions),
    d = d_model, f = FFN width, V vocabulary, a multiply-add counted as 2 FLOPs:
        conv stem       2*3*m*d*F (conv1) + 2*3*d*d*S (conv2, stride 2)
        encoder layer   2*S*(4*d^2 + 2*d*f)               q, k, v, out projections and the two FFN matmuls
                        + 4*S^2*d                          Q K^T and attention x V
        decoder layer   2*T*(4*d^2 + 2*d^2 + 2*d*f)        self-attention q, k, v, out; cross-attention q, out; FFN
                        + 2*S*2*d^2                        cross-attention k, v over the encoder states
                        + 4*T^2*d + 4*T*S*d                self- and cross-attention scores and sums
        output layer    2*T*d*V
    Causal self-attention is counted in full (the PaLM convention); layer norms, softmax, GELU, the loss and the
    optimizer (a few percent) are left out. tests/test_benchmark.py checks it against torch's FLOP counter.
    """
    d, m, V = config.d_model, config.num_mel_bins, config.vocab_size
    S = config.max_source_positions
    F = 2 * S
    T = n_label_tokens
    conv1, conv2 = 2 * 3 * m * d * F, 2 * 3 * d * d * S
    encoder = config.encoder_layers * (2 * S * (4 * d * d + 2 * d * config.encoder_ffn_dim) + 4 * S * S * d)
    decoder = config.decoder_layers * (
        2 * T * (6 * d * d + 2 * d * config.decoder_ffn_dim) + 2 * S * 2 * d * d + 4 * T * T * d + 4 * T * S * d
    )
    return 2.0 * conv1 + 3.0 * (conv2 + encoder + decoder + 2 * T * d * V)


def whisper_small_hi_memory(label_tokens: int = 128) -> dict:
    """Training memory of the whisper-small-hi preset as it is configured (its micro-batch), and of one batch of
    16, by `training_memory_estimate`, next to the reference recipe's figure."""
    train = yaml.safe_load(preset_path("whisper-small-hi").read_text(encoding="utf-8"))["train"]  # needs no data path
    micro_batch, precision = train["per_device_train_batch_size"], train["mixed_precision"]
    small = whisper_small_config()
    preset_gb = training_memory_estimate(small, micro_batch, label_tokens, precision)
    return {
        "label_tokens": label_tokens,
        "mixed_precision": precision,
        "preset_micro_batch": micro_batch,
        "preset_accumulation": train["gradient_accumulation_steps"],
        "preset_gb": preset_gb,
        "batch_16_gb": training_memory_estimate(small, 16, label_tokens, precision),
        "states_gb": preset_gb["weights_fp32"] + preset_gb["gradients_fp32"] + preset_gb["adamw_moments_fp32"],
        "reference_recipe_gb": REFERENCE_MEMORY_GB,
    }


def whisper_small_config():
    """openai/whisper-small's architecture (the Hub config, written out so it needs no network)."""
    return WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
                         encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                         decoder_ffn_dim=3072, max_source_positions=1500, max_target_positions=448)


def parameter_count(config) -> int:
    """Parameters of a WhisperForConditionalGeneration with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # tied output layer counted once


def training_memory_estimate(config, batch_size: int = 16, n_label_tokens: int = 128, mixed_precision: str = "fp16",
                             separate_loss: bool = False) -> dict[str, float]:
    """Training memory in GB on one GPU: fp32 weights, gradients and AdamW moments, plus what autograd keeps for
    the backward pass, without gradient checkpointing and with SDPA attention (no S^2 score matrices kept).

    Bytes kept per position and layer under fp16 autocast (h = 2 bytes per half, 4 per float):
        encoder layer  4d (LN input, fp32) + 2d (its fp16 cast) + 6d (q, k, v) + 2d (attention output)
                       + 4d (LN input) + 2d (cast) + 2f (fc1 output) + 2f (GELU output)       = 20d + 4f
        decoder layer  the same with a cross-attention block (4d + 2d + 2d + 2d) added         = 30d + 4f
                       plus per encoder position: two fp16 casts of the encoder states and k, v  = 8d
    Conv stem per example: 2mF + 4dF (conv1 output and GELU) + 8dS (conv2, GELU, positions in fp32).
    Logits: 2TV (fp16) + 8TV for one loss (fp32 upcast and log-softmax); `separate_loss` adds a second fp32
    cross-entropy over the same logits (another 8TV): what the loop paid while it passed `labels` to the model
    and computed its own summed loss as well (loop/loss.py now passes decoder inputs, so there is one loss). Allocator slack and the transient buffers of the
    backward pass come on top: read the total as a lower bound within about 20%.
    """
    P = parameter_count(config)
    d, m, V = config.d_model, config.num_mel_bins, config.vocab_size
    S = config.max_source_positions
    F, T, b = 2 * S, n_label_tokens, batch_size
    half = mixed_precision in ("fp16", "bf16")
    scale = 1.0 if half else 2.0  # without autocast every kept activation is fp32
    gb = 1e9
    parts = {
        "weights_fp32": 4 * P / gb,
        "gradients_fp32": 4 * P / gb,
        "adamw_moments_fp32": 8 * P / gb,
        "autocast_weight_copies": (2 * P if half else 0) / gb,
        "encoder_activations": scale * b * S * config.encoder_layers * (20 * d + 4 * config.encoder_ffn_dim) / gb,
        "conv_stem_activations": scale * b * (2 * m * F + 4 * d * F + 8 * d * S) / gb,
        "decoder_activations": scale * b * config.decoder_layers * (T * (30 * d + 4 * config.decoder_ffn_dim) + 8 * d * S) / gb,
        "logits_and_loss": b * T * V * (2 + 8 + (8 if separate_loss else 0)) / gb,
    }
    parts["total"] = sum(parts.values())
    parts["parameters"] = P
    return parts


# --------------------------------------------------------------------------------------------------------------
# The reference recipe (Hugging Face blog "Fine-Tune Whisper For Multilingual ASR with Transformers")


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """The blog's collator, as the blog has it: the reference, not ours (ours is loop.collator)."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features):
        # split inputs and labels since they have to be of different lengths and need different padding methods
        # first treat the audio inputs by simply returning torch tensors
        input_features = [{"input_features": feature["input_features"]} for feature in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")

        # get the tokenized label sequences
        label_features = [{"input_ids": feature["labels"]} for feature in features]
        # pad the labels to max length
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")

        # replace padding with -100 to ignore loss correctly
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)

        # if bos token is appended in previous tokenization step,
        # cut bos token here as it's append later anyways
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]

        batch["labels"] = labels

        return batch


class NumpyPathWhisperFeatureExtractor(WhisperFeatureExtractor):
    """The Whisper feature extractor on its NumPy STFT, one clip at a time, as it runs where torch is not
    installed: `__call__` takes `_torch_extract_fbank_features` whenever torch imports and no argument picks the
    NumPy method, so the torch one is pointed at it."""

    def _torch_extract_fbank_features(self, waveform, device="cpu"):
        return self._np_extract_fbank_features(waveform, device)


def numpy_path_feature_extractor(feature_extractor) -> NumpyPathWhisperFeatureExtractor:
    """A copy of `feature_extractor` (same settings) that takes the NumPy path."""
    return NumpyPathWhisperFeatureExtractor(**feature_extractor.to_dict())


def blog_prepare_dataset(batch, feature_extractor, tokenizer):
    """The blog's `prepare_dataset` (one example per call). The blog's `batch["audio"]` is decoded at 16 kHz by
    datasets' Audio column; here the same decoder as on our side reads the clip."""
    audio = decode_audio(batch["audio_path"])
    # compute log-Mel input features from input audio array
    batch["input_features"] = feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_features[0]
    # encode target text to label ids
    batch["labels"] = tokenizer(batch["sentence"]).input_ids
    return batch


def reference_prepare(rows, feature_extractor, tokenizer, cache_file: Path, num_proc: int):
    """The blog's `common_voice.map(prepare_dataset, remove_columns=...)` over manifest rows."""
    return rows.map(
        blog_prepare_dataset,
        fn_kwargs={"feature_extractor": feature_extractor, "tokenizer": tokenizer},
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(cache_file),
        load_from_cache_file=False,
    )


def blog_compute_metrics(tokenizer):
    """The blog's WER `compute_metrics` (jiwer, which `evaluate.load("wer")` wraps)."""
    import jiwer

    def compute_metrics(pred):
        pred_ids = pred.predictions
        label_ids = pred.label_ids
        # replace -100 with the pad_token_id
        label_ids[label_ids == -100] = tokenizer.pad_token_id
        pred_ids[pred_ids == -100] = tokenizer.pad_token_id  # not in the blog: rows of unequal length are padded with -100
        # we do not want to group tokens when computing the metrics
        pred_str = tokenizer.batch_decode(pred_ids, skip_special_tokens=True)
        label_str = tokenizer.batch_decode(label_ids, skip_special_tokens=True)
        references = [r if r.strip() else "<empty>" for r in label_str]  # not in the blog: jiwer rejects empty ones
        return {"wer": 100 * jiwer.wer(references, pred_str)}

    return compute_metrics


def reference_model(model_dir: Path, settings: BenchSettings):
    """The blog's model set-up: language and task in the generation config, no forced decoder ids."""
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, attn_implementation=settings.attn_implementation)
    model.generation_config.language = LANGUAGE
    model.generation_config.task = TASK
    model.generation_config.forced_decoder_ids = None
    return model


def reference_arguments(settings: BenchSettings, output_dir: Path):
    """The blog's Seq2SeqTrainingArguments, with the benchmark's sizes and no evaluation, saving or logging."""
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate,
        warmup_steps=0,
        max_steps=settings.warmup_steps + settings.timed_steps,
        gradient_checkpointing=settings.gradient_checkpointing,
        fp16=settings.precision == "fp16",
        bf16=settings.precision == "bf16",
        eval_strategy="no",
        per_device_eval_batch_size=settings.reference_eval_batch_size,
        predict_with_generate=True,
        generation_max_length=settings.generation_max_length,
        save_strategy="no",
        logging_steps=10**9,
        report_to="none",
        dataloader_num_workers=settings.dataloader_num_workers,
        seed=settings.seed,
        disable_tqdm=True,
    )


# --------------------------------------------------------------------------------------------------------------
# The shared workspace: model folder, manifests, prepared data (built once, in the parent process)


@dataclass
class Workspace:
    """The folder the parent fills and the children read: model, manifests, both sides' prepared tables."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def loop_cache(self) -> Path:
        return self.root / "loop-cache"

    @property
    def reference_data(self) -> Path:
        return self.root / "reference-data"


def corpus_clips(splits: tuple[str, ...]) -> list[dict]:
    folder = find_common_voice_dir(str(CORPUS))
    return [row for split in splits for row in read_common_voice_split(folder, split, SkipLog())]


def write_manifest(path: Path, rows: list[dict]) -> None:
    """A CSV manifest (audio, sentence, client_id), the loop's `manifest` source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio", "sentence", "client_id"])
        writer.writerows([row["audio_path"], row["text"], row["client_id"]] for row in rows)


def build_model(settings: BenchSettings, folder: Path) -> Path:
    """The shape's random-init Whisper with the corpus-trained tokenizer; timestamp tokens are suppressed in its
    generation config (see the module docstring)."""

    shape = SHAPES[settings.shape]
    sentences = [row["text"] for row in corpus_clips(("train", "dev"))]
    build_tiny_whisper(sentences, folder, vocab_size=BPE_VOCAB_SIZE, chunk_length_s=shape.chunk_length_s,
                       d_model=shape.d_model, layers=shape.layers, heads=shape.heads,
                       max_target_positions=shape.max_target_positions, seed=settings.seed)
    generation = GenerationConfig.from_pretrained(folder)
    first_timestamp = generation.no_timestamps_token_id + 1
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    generation.suppress_tokens = list(range(first_timestamp, vocab))
    generation.save_pretrained(folder)
    return folder


def loop_config(settings: BenchSettings, workspace: Workspace, *overrides: str):
    """Our run configuration for the benchmark: the manifests, the model, the sizes; `overrides` as on the command line."""
    steps = settings.warmup_steps + settings.timed_steps
    return load_config(None, [
        f"--model.name_or_path={workspace.model_dir}",
        f"--model.language={LANGUAGE}",
        f"--model.attn_implementation={settings.attn_implementation}",
        f"--model.gradient_checkpointing={settings.gradient_checkpointing}",
        "--data.source=manifest",
        f"--data.path={workspace.manifest_dir}",
        "--data.train_splits=train",
        "--data.eval_split=eval",
        f"--data.cache_dir={workspace.loop_cache}",
        f"--data.num_proc={settings.prep_num_proc}",
        "--eval.select_on=test",  # the eval clips are the selection split: no slice taken from the training clips
        f"--train.per_device_train_batch_size={settings.train_batch_size}",
        f"--train.learning_rate={settings.learning_rate}",
        "--train.warmup_steps=0",
        f"--train.max_steps={steps}",
        f"--train.save_steps={steps}",
        f"--eval.eval_steps={steps}",
        f"--train.mixed_precision={settings.precision}",
        f"--train.dataloader_num_workers={settings.dataloader_num_workers}",
        f"--train.seed={settings.seed}",
        "--train.report_to=none",
        f"--eval.per_device_eval_batch_size={settings.eval_batch_size}",
        f"--eval.generation_max_length={settings.generation_max_length}",
        "--eval.eval_on_start=false",
        *overrides,
    ], str(workspace.root / "loop-run"))


def packed_config(settings: BenchSettings, workspace: Workspace):
    """Our run configuration with the packed manifest as training data, packed to the shape's audio window."""
    return loop_config(settings, workspace, f"--data.train_splits={PACKED}",
                       f"--data.pack_to_seconds={SHAPES[settings.shape].chunk_length_s}")


def manifest_rows(workspace: Workspace, split: str):
    """A manifest split as the blog's dataset columns (audio path, sentence), plus the clip id."""
    with open(workspace.manifest_dir / f"{split}.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return datasets.Dataset.from_list(
        [{"id": Path(r["audio"]).stem, "audio_path": r["audio"], "sentence": r["sentence"]} for r in rows]
    )


def prepare_workspace(settings: BenchSettings, root: Path) -> Workspace:
    """Model, manifests, and both sides' prepared train and eval tables (untimed; the children read them)."""
    workspace = Workspace(root)
    build_model(settings, workspace.model_dir)
    train = corpus_clips(("train", "dev"))[: settings.train_clips]
    # Speed does not depend on which clips are decoded: the test split first, then others if more are asked for.
    evaluation = corpus_clips(("test", "dev", "train"))[: settings.eval_clips]
    if len(train) < settings.train_clips or len(evaluation) < settings.eval_clips:
        raise ValueError(f"the corpus has {len(train)} training and {len(evaluation)} eval clips; "
                         f"lower --train_clips / --eval_clips")
    write_manifest(workspace.manifest_dir / "train.csv", train)
    write_manifest(workspace.manifest_dir / "eval.csv", evaluation)
    datasets.disable_progress_bars()
    config = loop_config(settings, workspace)
    processor = load_processor(str(workspace.model_dir), LANGUAGE, TASK)
    data = build_datasets(config, processor, SHAPES[settings.shape].max_target_positions)
    if settings.packing:  # every training clip of the corpus, so the packed rows fill the timed steps
        write_manifest(workspace.manifest_dir / f"{PACKED}.csv", corpus_clips(("train", "dev")))
        build_datasets(packed_config(settings, workspace), processor, SHAPES[settings.shape].max_target_positions)
    (root / "clips.json").write_text(json.dumps({"train_mean_duration_s": statistics.fmean(data.train["duration"])}))
    numpy_path = numpy_path_feature_extractor(processor.feature_extractor)
    for split in ("train", "eval"):
        reference_prepare(manifest_rows(workspace, split), numpy_path, processor.tokenizer,
                          workspace.reference_data / f"{split}.arrow", settings.prep_num_proc)
    return workspace


# --------------------------------------------------------------------------------------------------------------
# Measurements inside a child process


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MemoryPeak:
    """Peak resident memory while the block runs (MB, sampled every 20 ms by a thread, since the process peak
    cannot be reset) and, on a GPU, the peak CUDA allocation (GB)."""

    def __enter__(self):
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = resident_mb()
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def __exit__(self, *exc):
        synchronize()
        self.done.set()
        self.sampler.join()
        self.peak_mb = max(self.peak_mb, resident_mb())

    def figures(self) -> dict:
        figures = {"peak_rss_mb": self.peak_mb}
        if torch.cuda.is_available():
            figures["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return figures


class LabelWidths:
    """Records the padded label width of every batch that passes (decoder positions, for the FLOP count)."""

    def __init__(self):
        self.widths: list[int] = []

    def batches(self, batches):
        for batch in batches:
            self.widths.append(int(batch["labels"].shape[1]))
            yield batch

    def collator(self, collate):
        def recording(rows):
            batch = collate(rows)
            self.widths.append(int(batch["labels"].shape[1]))
            return batch

        return recording

    def mean(self) -> float:
        return statistics.fmean(self.widths) if self.widths else 0.0


def time_loop_prep(config, processor, threads: int = 0) -> dict:
    """Ours: `loop.data.prepare` of the training manifest into an empty cache folder."""
    rows = load_utterances(config.data, "train", SkipLog())
    max_label_length = WhisperConfig.from_pretrained(config.model.name_or_path).max_target_positions
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=config.data.cache_dir) as fresh:
        if threads:
            torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            table = prepare(rows, processor.feature_extractor, processor.tokenizer,
                            SplitReport("train"), max_duration_s=config.data.max_duration_s,
                            max_label_length=max_label_length, num_proc=config.data.num_proc, cache_dir=fresh)
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(saved_threads)
        kept = len(table)
    return {"clips": len(rows), "kept": kept, "seconds": seconds, "clips_per_second": len(rows) / seconds}


def time_reference_prep(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: the blog's one-example-at-a-time map on the NumPy STFT, into an empty cache file."""
    rows = manifest_rows(workspace, "train")
    numpy_path = numpy_path_feature_extractor(processor.feature_extractor)
    with tempfile.TemporaryDirectory(dir=workspace.root) as fresh:
        started = time.perf_counter()
        table = reference_prepare(rows, numpy_path, processor.tokenizer, Path(fresh) / "train.arrow",
                                  settings.prep_num_proc)
        seconds = time.perf_counter() - started
        kept = len(table)
    return {"clips": len(rows), "kept": kept, "seconds": seconds, "clips_per_second": len(rows) / seconds}


def time_loop_training(run, warmup_steps: int, timed_steps: int, batches=None) -> dict:
    """`warmup_steps` untimed then `timed_steps` timed calls of `loop.train.optimizer_step`, as `fit()` makes them."""
    widths = LabelWidths()
    batches = batches if batches is not None else widths.batches(endless_batches(run))
    with MemoryPeak() as memory:  # warm-up and timed steps, as on the reference side
        for _ in range(warmup_steps):
            optimizer_step(run, batches)
        synchronize()
        widths.widths.clear()
        samples, utterances, audio_s = 0, 0, 0.0
        started = time.perf_counter()
        for _ in range(timed_steps):
            _, _, _, step_samples, step_utterances, step_audio_s = optimizer_step(run, batches)
            samples, utterances, audio_s = samples + step_samples, utterances + step_utterances, audio_s + step_audio_s
        synchronize()
        seconds = time.perf_counter() - started
    return {"steps": timed_steps, "samples": samples, "seconds": seconds, "samples_per_second": samples / seconds,
            "utterances_per_second": int(utterances) / seconds, "audio_seconds_per_second": float(audio_s) / seconds,
            "label_tokens": widths.mean(), **memory.figures()}


def loop_eval_model(run):
    """A fresh copy of the folder's weights, so both sides decode with the same (initial) model."""
    model, _ = load_model(run.config.model, run.config.eval)
    return run.accelerator.prepare_model(model, evaluation_mode=True)


def time_loop_eval(run, model, loader=None) -> dict:
    """Ours: `loop.evaluation.evaluate` (loss and generation) over the longest-first selection loader."""
    with MemoryPeak() as memory:
        started = time.perf_counter()
        result = evaluate(model, loader or run.selection_loader, run.accelerator, run.processor.tokenizer,
                          run.data.selection["text"], run.config.model.language, description="benchmark eval")
        synchronize()
        seconds = time.perf_counter() - started
    ids = run.data.selection["id"]
    hypotheses = {ids[p["index"]]: p["hypothesis"] for p in result.predictions}
    n = result.metrics["num_utterances"]
    return {"utterances": n, "seconds": seconds, "utterances_per_second": n / seconds, "wer": result.metrics["wer"],
            "hypotheses": hypotheses, **memory.figures()}


def step_clock():
    """A Trainer callback noting the time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()


def time_reference_training(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: `Seq2SeqTrainer.train()` for warmup + timed steps; the timed span runs from the end of the last
    warm-up step to the end of the last step."""
    from transformers import Seq2SeqTrainer

    model = reference_model(workspace.model_dir, settings)
    train = datasets.Dataset.from_file(str(workspace.reference_data / "train.arrow"))
    widths = LabelWidths()
    clock = step_clock()
    collator = DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id)
    trainer = Seq2SeqTrainer(
        model=model,
        args=reference_arguments(settings, workspace.root / "reference-run"),
        train_dataset=train,
        data_collator=widths.collator(collator),
        processing_class=processor.feature_extractor,
        callbacks=[clock],
    )
    with MemoryPeak() as memory:
        trainer.train()
    ends = clock.ends
    seconds = ends[-1] - ends[settings.warmup_steps - 1]
    samples = settings.timed_steps * settings.train_batch_size
    mean_duration = json.loads((workspace.root / "clips.json").read_text())["train_mean_duration_s"]
    timed_widths = widths.widths[settings.warmup_steps:]
    return {"steps": settings.timed_steps, "samples": samples, "seconds": seconds,
            "samples_per_second": samples / seconds,
            # the Trainer never sees durations: samples x the training clips' mean duration
            "audio_seconds_per_second": samples * mean_duration / seconds,
            "label_tokens": statistics.fmean(timed_widths) if timed_widths else 0.0, **memory.figures()}


def time_reference_eval(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: `trainer.predict` with `predict_with_generate` on a fresh copy of the folder's weights."""
    from transformers import Seq2SeqTrainer

    model = reference_model(workspace.model_dir, settings)
    evaluation = datasets.Dataset.from_file(str(workspace.reference_data / "eval.arrow"))
    trainer = Seq2SeqTrainer(
        model=model,
        args=reference_arguments(settings, workspace.root / "reference-run"),
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
        compute_metrics=blog_compute_metrics(processor.tokenizer),
        processing_class=processor.feature_extractor,
    )
    with MemoryPeak() as memory:
        started = time.perf_counter()
        prediction = trainer.predict(evaluation)
        synchronize()
        seconds = time.perf_counter() - started
    ids = manifest_rows(workspace, "eval")["id"]
    predicted = prediction.predictions
    predicted[predicted == -100] = processor.tokenizer.pad_token_id
    texts = [t.strip() for t in processor.tokenizer.batch_decode(predicted, skip_special_tokens=True)]
    n = len(evaluation)
    return {"utterances": n, "seconds": seconds, "utterances_per_second": n / seconds,
            "wer": prediction.metrics.get("test_wer"), "hypotheses": dict(zip(ids, texts)), **memory.figures()}


def quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_side(side: str, settings: BenchSettings, workspace: Workspace) -> dict:
    """One side, one repeat, in this (fresh) process: preparation, training, evaluation, in that order (for
    `PACKED`: training only)."""
    quiet_libraries()
    if side == PACKED:
        run = setup(packed_config(settings, workspace))
        return {"train": time_loop_training(run, settings.warmup_steps, settings.timed_steps)}
    processor = load_processor(str(workspace.model_dir), LANGUAGE, TASK)
    if side == "reference":
        return {"prep": time_reference_prep(settings, workspace, processor),
                "train": time_reference_training(settings, workspace, processor),
                "eval": time_reference_eval(settings, workspace, processor)}
    config = loop_config(settings, workspace)
    figures = {"prep": time_loop_prep(config, processor)}
    run = setup(config)  # the prepared tables come from the cache the parent filled
    figures["train"] = time_loop_training(run, settings.warmup_steps, settings.timed_steps)
    figures["eval"] = time_loop_eval(run, loop_eval_model(run))
    return figures


# --------------------------------------------------------------------------------------------------------------
# Fast paths: A/B tests of candidate changes on our side, alternated inside one process


def extraction_fast_paths(settings: BenchSettings, workspace: Workspace, rounds: int) -> dict:
    """Feature extraction alone (decoded waveforms in memory), clips/s, at the default torch threads and at 1."""
    fe = load_processor(str(workspace.model_dir)).feature_extractor
    numpy_path = numpy_path_feature_extractor(fe)
    waves = [decode_audio(path) for path in manifest_rows(workspace, "train")["audio_path"]]
    batches = lambda size: [waves[i:i + size] for i in range(0, len(waves), size)]  # noqa: E731
    variants = {
        "numpy, one clip at a time (reference)": lambda: [numpy_path(w, sampling_rate=SAMPLE_RATE) for w in waves],
        "torch, one clip at a time (the blog's code today)": lambda: [fe(w, sampling_rate=SAMPLE_RATE) for w in waves],
        "torch, batches of 16 (loop.data.prepare)": lambda: [fe(b, sampling_rate=SAMPLE_RATE) for b in batches(16)],
        "trimmed STFT, batches of 16 (loop.features)": lambda: [log_mel_features(b, fe) for b in batches(16)],
        "trimmed STFT, one clip at a time": lambda: [log_mel_features([w], fe) for w in waves],
    }
    default_threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {}
    for _ in range(rounds):
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            for name, extract in variants.items():
                started = time.perf_counter()
                extract()
                seconds.setdefault(f"{name}, {threads} thread(s)", []).append(time.perf_counter() - started)
    torch.set_num_threads(default_threads)
    parity = float(np.abs(log_mel_features(waves[:4], fe) - numpy_path(waves[:4], sampling_rate=SAMPLE_RATE).input_features).max())
    return {"clips": len(waves), "clips_per_second": {k: len(waves) / statistics.median(v) for k, v in seconds.items()},
            "trimmed_vs_numpy_max_abs_difference": parity}


def loop_fast_paths(settings: BenchSettings, workspace: Workspace, rounds: int, steps: int) -> dict:
    """Our side with one change at a time; baseline and variants alternate `rounds` times in this process."""
    quiet_libraries()
    processor = load_processor(str(workspace.model_dir), LANGUAGE, TASK)
    config = loop_config(settings, workspace)
    results = {"prep_clips_per_second": prep_fast_paths(config, processor, rounds)}
    run = setup(config)
    results["loading_ms_per_batch"] = loading_fast_paths(run, settings, workspace, rounds)
    results["train_samples_per_second"] = training_fast_paths(run, settings, rounds, steps)
    results.update(eval_fast_paths(run, settings, rounds))
    return results


@contextlib.contextmanager
def patched(module, name: str, replacement):
    """`module.name` is `replacement` inside the block: how an A/B variant puts back what the code did before."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def extractor_features(waveforms, feature_extractor):
    """The feature extractor's own batched torch path (STFT over the whole padded window): what
    `loop.data.prepare` ran before `loop.features.log_mel_features`."""
    return feature_extractor(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


def prep_fast_paths(config, processor, rounds: int) -> dict[str, float]:
    """clips/s of `loop.data.prepare` as is (trimmed STFT), with the feature extractor's batched path instead, and
    as is on one torch thread."""
    variants = {
        "loop.data.prepare as is (trimmed STFT)": ({}, contextlib.nullcontext),
        "with the feature extractor's batched torch path": (
            {}, lambda: patched(loop.data, "log_mel_features", extractor_features)),
        "as is, 1 torch thread": ({"threads": 1}, contextlib.nullcontext),
    }
    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, (kwargs, patch) in variants.items():
            with patch():
                figures.setdefault(name, []).append(time_loop_prep(config, processor, **kwargs)["clips_per_second"])
    return {name: statistics.median(values) for name, values in figures.items()}


class RowByRow(Rows):
    """`loop.data.Rows` without its batched read: the DataLoader then calls `__getitem__` once per row."""

    __getitems__ = None


def loading_fast_paths(run, settings: BenchSettings, workspace: Workspace, rounds: int) -> dict[str, float]:
    """Milliseconds to load and collate one training batch, without the model: our loader, ours reading row by
    row, ours with 2 workers, and the reference's (the blog's collator over the blog's prepared table, as the Trainer's loader reads it)."""
    unwrapped = run.accelerator.unwrap_model(run.model)
    with_workers = copy.deepcopy(run.config)
    with_workers.train.dataloader_num_workers = 2
    start_token = unwrapped.config.decoder_start_token_id
    loaders = {
        "ours (loop.data.Rows + loop.collator)": run.train_loader,
        "ours, one Arrow read per row": torch.utils.data.DataLoader(
            RowByRow(run.data.train), batch_size=settings.train_batch_size, shuffle=True,
            collate_fn=SpeechSeq2SeqCollator(start_token)),
        "ours, 2 workers": get_dataloaders(with_workers, run.data, unwrapped)[0],
        "reference (lists from Arrow + the blog's collator)": torch.utils.data.DataLoader(
            datasets.Dataset.from_file(str(workspace.reference_data / "train.arrow")),
            batch_size=settings.train_batch_size, shuffle=True,
            collate_fn=DataCollatorSpeechSeq2SeqWithPadding(run.processor, start_token)),
    }
    batches = max(1, settings.train_clips // settings.train_batch_size - 1)  # within one epoch, after the first
    figures: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, loader in loaders.items():
            iterator = iter(loader)
            next(iterator)  # starts the workers, if any
            started = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            figures.setdefault(name, []).append(1000 * (time.perf_counter() - started) / batches)
            del iterator
    return {name: statistics.median(values) for name, values in figures.items()}


def loss_with_labels(model, batch):
    """What `loop.train.summed_token_loss` did before `loop.loss`: the model gets `labels`, so it also computes a
    mean loss of its own, which is thrown away."""
    logits = model(input_features=batch["input_features"], labels=batch["labels"]).logits
    return F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="sum")


def training_fast_paths(run, settings: BenchSettings, rounds: int, steps: int) -> dict[str, float]:
    """samples/s of `optimizer_step` as is, with 2 DataLoader workers, eager attention, torch's default (unfused)
    AdamW, and with the model computing its own loss as well."""
    unwrapped = run.accelerator.unwrap_model(run.model)
    with_workers = copy.deepcopy(run.config)
    with_workers.train.dataloader_num_workers = 2
    workers_loader = run.accelerator.prepare(get_dataloaders(with_workers, run.data, unwrapped)[0])
    workers_run = replace(run, train_loader=workers_loader, state=LoopState())  # its own epoch and batch counters
    fused_optimizer = run.optimizer.optimizer  # inside Accelerate's wrapper, which stays registered as it is
    default_optimizer = torch.optim.AdamW([p for p in unwrapped.parameters() if p.requires_grad],
                                          lr=run.config.train.learning_rate)
    plain_batches, worker_batches = endless_batches(run), endless_batches(workers_run)
    attention = settings.attn_implementation
    other_attention = "eager" if attention == "sdpa" else "sdpa"
    workers_name = "2 DataLoader workers" + (" + pinned memory" if torch.cuda.is_available() else "")
    same = contextlib.nullcontext
    variants = {  # name: (run, batches, attention, optimizer, patch)
        f"as is ({attention}, 0 workers, fused AdamW, one loss)": (run, plain_batches, attention, fused_optimizer, same),
        workers_name: (workers_run, worker_batches, attention, fused_optimizer, same),
        f"{other_attention} attention": (run, plain_batches, other_attention, fused_optimizer, same),
        "torch's default AdamW (not fused)": (run, plain_batches, attention, default_optimizer, same),
        "labels to the model (a second, discarded loss)": (
            run, plain_batches, attention, fused_optimizer,
            lambda: patched(loop.train, "summed_token_loss", loss_with_labels)),
    }
    figures: dict[str, list[float]] = {}
    for number in range(rounds):
        for name, (variant_run, batches, variant_attention, optimizer, patch) in variants.items():
            unwrapped.set_attn_implementation(variant_attention)
            run.optimizer.optimizer = optimizer
            with patch():
                timed = time_loop_training(variant_run, 1 if number == 0 else 0, steps, batches)
            figures.setdefault(name, []).append(timed["samples_per_second"])
    unwrapped.set_attn_implementation(attention)
    run.optimizer.optimizer = fused_optimizer
    return {name: statistics.median(values) for name, values in figures.items()}


def eval_loader(run, order: list[int] | None, batch_size: int):
    """A selection-split loader in `order` (None: table order) at `batch_size`, otherwise as `get_dataloaders` makes it."""
    start_token = run.accelerator.unwrap_model(run.model).config.decoder_start_token_id
    return run.accelerator.prepare(torch.utils.data.DataLoader(
        Rows(run.data.selection, order), batch_size=batch_size,
        collate_fn=SpeechSeq2SeqCollator(start_token)))


def eval_fast_paths(run, settings: BenchSettings, rounds: int) -> dict[str, dict]:
    """utterances/s (and on a GPU peak memory) of `evaluate` as is, with generate computing the cross-attention
    keys and values again, with two encoder passes per batch (one for the loss, one in generate), unsorted, and at
    the reference's eval batch; plus whether each gave the same transcripts."""
    model = loop_eval_model(run)
    selection = run.data.selection
    small_batch = settings.reference_eval_batch_size
    encoder_again = lambda: patched(  # noqa: E731
        loop.evaluation, "generate_ids", lambda model, features, *shared: generate_ids(model, features))
    cross_attention_again = lambda: patched(loop.evaluation, "shares_cross_attention", lambda settings: False)  # noqa: E731
    same = contextlib.nullcontext
    variants = {
        "as is (longest first, one encoder pass per batch)": (None, same),
        "cross-attention keys and values computed again in generate": (None, cross_attention_again),
        "two encoder passes per batch": (None, encoder_again),
        "unsorted": (eval_loader(run, None, settings.eval_batch_size), same),
        f"batch {small_batch}": (eval_loader(run, longest_first(selection), small_batch), same),
    }
    speed: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    transcripts: dict[str, dict] = {}
    for _ in range(rounds):
        for name, (variant_loader, patch) in variants.items():
            with patch():
                figures = time_loop_eval(run, model, variant_loader)
            speed.setdefault(name, []).append(figures["utterances_per_second"])
            if "cuda_peak_gb" in figures:  # a CPU process's resident memory depends on what ran before in it
                memory[name] = figures["cuda_peak_gb"]
            transcripts[name] = figures["hypotheses"]
    baseline = transcripts["as is (longest first, one encoder pass per batch)"]
    return {
        "eval_utterances_per_second": {name: statistics.median(values) for name, values in speed.items()},
        **({"eval_cuda_peak_gb": memory} if memory else {}),
        "eval_same_transcripts_as_baseline": {
            name: sum(t.get(i) == h for i, h in baseline.items()) / max(1, len(baseline)) for name, t in transcripts.items()},
    }


# --------------------------------------------------------------------------------------------------------------
# Orchestration (parent process)


def machine_facts() -> dict:

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


def child(task: str, settings: BenchSettings, workspace: Workspace, label: str, **extra) -> dict:
    """Runs `task` in a fresh Python process; returns its figures. The child's output goes to a log file that is
    shown if it fails."""
    spec = workspace.root / f"{label}.spec.json"
    result = workspace.root / f"{label}.result.json"
    log = workspace.root / f"{label}.log"
    spec.write_text(json.dumps({"task": task, "settings": asdict(settings), "root": str(workspace.root), **extra}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # both sides take their precision from the settings
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "loop.benchmark", str(spec), str(result)], cwd=PROJECT,
                               env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"benchmark child {label} failed with exit code {code}; end of {log}:\n{tail}")
    return json.loads(result.read_text())


def median_figures(runs: list[dict]) -> dict:
    """Median over repeats of every numeric figure, phase by phase."""
    merged: dict[str, dict] = {}
    for phase in runs[0]:
        keys = [k for k, v in runs[0][phase].items() if isinstance(v, (int, float)) and v is not None]
        merged[phase] = {k: statistics.median(r[phase][k] for r in runs) for k in keys}
    return merged


def summarize(runs: dict[str, list[dict]], settings: BenchSettings, workspace: Workspace) -> dict:

    ours, reference = median_figures(runs["loop"]), median_figures(runs["reference"])
    ratio = lambda phase, key: ours[phase][key] / reference[phase][key]  # noqa: E731
    ratios = {
        "train_samples_per_second": ratio("train", "samples_per_second"),
        "eval_utterances_per_second": ratio("eval", "utterances_per_second"),
        "prep_clips_per_second": ratio("prep", "clips_per_second"),
        "train_audio_seconds_per_second": ratio("train", "audio_seconds_per_second"),
        "train_peak_rss": ratio("train", "peak_rss_mb"),
        "eval_peak_rss": ratio("eval", "peak_rss_mb"),
    }
    packed = median_figures(runs[PACKED]) if runs.get(PACKED) else None
    if packed:  # utterances, not rows: the reference's rows are one utterance each
        ratios["train_utterances_per_second_packed"] = (packed["train"]["utterances_per_second"]
                                                        / reference["train"]["samples_per_second"])
    if "cuda_peak_gb" in ours["train"]:
        ratios["train_cuda_peak_memory"] = ratio("train", "cuda_peak_gb")
        ratios["eval_cuda_peak_memory"] = ratio("eval", "cuda_peak_gb")
    config = WhisperConfig.from_pretrained(workspace.model_dir)
    flops = {}
    for side, figures in (("loop", ours), ("reference", reference)):
        per_sample = training_flops_per_sample(config, figures["train"]["label_tokens"])
        achieved = per_sample * figures["train"]["samples_per_second"]
        flops[side] = {"training_flops_per_sample": per_sample, "achieved_tflops": achieved / 1e12}
        if "cuda_peak_gb" in figures["train"]:
            flops[side]["mfu"] = achieved / (settings.peak_tflops * 1e12)
    agree = [sum(r["eval"]["hypotheses"].get(i) == h for i, h in o["eval"]["hypotheses"].items())
             / max(1, len(o["eval"]["hypotheses"])) for o, r in zip(runs["loop"], runs["reference"])]
    for side in SIDES:  # the transcripts were only needed for the comparison
        for r in runs[side]:
            r["eval"].pop("hypotheses", None)
    return {
        "ratios": ratios,
        "loop": ours,
        "reference": reference,
        **({PACKED: packed} if packed else {}),
        "flops": flops,
        "same_transcripts_fraction": statistics.fmean(agree) if agree else None,
        "raw": runs,
        "parameters": parameter_count(config),
    }


def run_benchmark(settings: BenchSettings) -> dict:
    """The whole comparison (or, with `fast_paths`, the A/B tests); prints a table, writes `output`, returns the
    JSON object."""
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
        if settings.fast_paths:
            report = {"fast_paths": {
                "feature_extraction": extraction_fast_paths(settings, workspace, rounds=max(1, settings.repeats)),
                **child("fast_paths", settings, workspace, "fast-paths", rounds=max(1, settings.repeats)),
            }}
        else:
            processes = SIDES + ((PACKED,) if settings.packing else ())
            runs: dict[str, list[dict]] = {side: [] for side in processes}
            for repeat in range(settings.repeats):
                for side in processes:
                    began = time.perf_counter()
                    runs[side].append(child("side", settings, workspace, f"{side}-{repeat}", side=side))
                    print(f"  repeat {repeat + 1}/{settings.repeats} {side}: {time.perf_counter() - began:.0f} s", flush=True)
            report = summarize(runs, settings, workspace)
    finally:
        if not settings.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    report.update({
        "settings": asdict(settings),
        **machine_facts(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": time.perf_counter() - started,
    })
    report["memory_estimate_whisper_small_hi"] = whisper_small_hi_memory()
    print(format_report(report), flush=True)
    if settings.output:
        Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.output).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def format_report(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [
        f"machine: {m['device']}, {m['cpus_usable']} CPUs, {m['torch_threads']} torch threads; load average "
        f"{report['load_average']['before'][0]:.2f} before, {report['load_average']['after'][0]:.2f} after",
        f"shape {s['shape']}, precision {s['precision']}, train batch {s['train_batch_size']} x "
        f"{s['timed_steps']} timed steps (+{s['warmup_steps']} warm-up), {s['train_clips']} clips prepared, "
        f"{s['eval_clips']} decoded to at most {s['generation_max_length']} tokens (eval batch ours "
        f"{s['eval_batch_size']}, reference {s['reference_eval_batch_size']}), medians of {s['repeats']} repeat(s)",
    ]
    if "ratios" in report:
        ours, ref, r = report["loop"], report["reference"], report["ratios"]
        rows = [
            ("data preparation, clips/s", ours["prep"]["clips_per_second"], ref["prep"]["clips_per_second"], r["prep_clips_per_second"]),
            ("training, samples/s", ours["train"]["samples_per_second"], ref["train"]["samples_per_second"], r["train_samples_per_second"]),
            ("training, audio s/s", ours["train"]["audio_seconds_per_second"], ref["train"]["audio_seconds_per_second"], r["train_audio_seconds_per_second"]),
            ("evaluation, utterances/s", ours["eval"]["utterances_per_second"], ref["eval"]["utterances_per_second"], r["eval_utterances_per_second"]),
            ("peak RSS in training, MB", ours["train"]["peak_rss_mb"], ref["train"]["peak_rss_mb"], r["train_peak_rss"]),
            ("peak RSS in evaluation, MB", ours["eval"]["peak_rss_mb"], ref["eval"]["peak_rss_mb"], r["eval_peak_rss"]),
        ]
        if "train_cuda_peak_memory" in r:
            rows.append(("peak CUDA memory in training, GB", ours["train"]["cuda_peak_gb"], ref["train"]["cuda_peak_gb"], r["train_cuda_peak_memory"]))
            rows.append(("peak CUDA memory in evaluation, GB", ours["eval"]["cuda_peak_gb"], ref["eval"]["cuda_peak_gb"], r["eval_cuda_peak_memory"]))
        for side in SIDES:
            f = report["flops"][side]
            extra = f", MFU {100 * f['mfu']:.1f}% of {s['peak_tflops']:g} TFLOP/s" if "mfu" in f else ""
            lines.append(f"{side}: {f['training_flops_per_sample'] / 1e9:.1f} GFLOP per training sample, "
                         f"{f['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved{extra}")
        lines.append(f"{'':34}{'ours':>12}{'reference':>12}{'ratio':>9}")
        lines += [f"{name:34}{a:12.3f}{b:12.3f}{c:8.2f}x" for name, a, b, c in rows]
        if PACKED in report:
            packed = report[PACKED]["train"]
            lines.append(
                f"{'training, utterances/s, packed rows':34}{packed['utterances_per_second']:12.3f}"
                f"{ref['train']['samples_per_second']:12.3f}{r['train_utterances_per_second_packed']:8.2f}x"
                f"   ({packed['samples_per_second']:.3f} rows/s of {packed['utterances_per_second'] / packed['samples_per_second']:.1f} "
                f"utterances, {packed['label_tokens']:.0f} label tokens; peak RSS {packed['peak_rss_mb']:.0f} MB)")
        lines.append(f"same transcripts on both sides: {100 * report['same_transcripts_fraction']:.0f}%")
    if "fast_paths" in report:
        for group, figures in report["fast_paths"].items():
            lines.append(f"fast paths, {group}:")
            for key, value in figures.items():
                if isinstance(value, dict):
                    lines += [f"    {name:62} {v:10.3f}" for name, v in value.items()]
                else:
                    lines.append(f"    {key}: {value}")
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


def child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    settings = BenchSettings(**spec["settings"])
    workspace = Workspace(Path(spec["root"]))
    if spec["task"] == "side":
        figures = run_side(spec["side"], settings, workspace)
    else:
        steps = max(1, settings.timed_steps - 1)
        figures = loop_fast_paths(settings, workspace, spec["rounds"], steps)
    Path(result_path).write_text(json.dumps(figures))


if __name__ == "__main__":
    child_main(*sys.argv[1:3])
