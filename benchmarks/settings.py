"""What the benchmark measures and how: the Whisper shapes, the settings dataclass and its command line.

The command line is generated from the dataclass (`loop.config.field_docs` gives each option its help), so an
option, its default and its help are one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, replace

import torch

from benchmarks.estimates import H100_DENSE_TFLOPS
from loop.config import field_docs

LANGUAGE, TASK = "hindi", "transcribe"  # both sides' label prefix and generation settings


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
SHAPE_SIZES = ("train_batch_size", "eval_batch_size", "warmup_steps", "timed_steps", "train_clips", "eval_clips",
               "generation_max_length")  # the settings where 0 means "the shape's"


@dataclass
class BenchSettings:
    """What to measure and how: the options of `python -m benchmarks.run`."""

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
    """Attention kernel of both sides' models: `sdpa` or `eager`."""
    dataloader_num_workers: int = 0
    """Training DataLoader workers on both sides (both recipes default to 0)."""
    prep_num_proc: int = 1
    """`datasets.map` processes for data preparation, on both sides."""
    peak_tflops: float = H100_DENSE_TFLOPS
    """Accelerator peak in TFLOP/s, for model FLOPs utilisation (GPU only)."""
    seed: int = 42
    """Seed of the random-init model and of both sides' training."""
    quick: bool = False
    """The `test` shape, one repeat: checks that the benchmark runs, measures nothing."""
    packing: bool = True
    """Also time our training on rows packed to the audio window (utterances/s; one more process per repeat)."""
    dynamic: bool = True
    """Also time our training and evaluation at the dynamic encoder window, batches grouped by length (one more
    process per repeat)."""
    output: str = ""
    """JSON file for the results."""
    work_dir: str = ""
    """Where model, manifests and prepared data go (default: a temporary folder, removed at the end)."""

    def resolved(self) -> BenchSettings:
        """The settings with the shape's defaults filled in and `quick` applied."""
        settings = replace(self, shape="test", repeats=1) if self.quick else replace(self)
        if settings.shape == "auto":
            settings.shape = "small" if torch.cuda.is_available() else "tiny"
        shape = SHAPES.get(settings.shape)
        if shape is None:
            return settings  # validate() names the unknown shape
        for name in SHAPE_SIZES:
            if not getattr(settings, name):
                setattr(settings, name, getattr(shape, name))
        if settings.precision == "auto":
            settings.precision = "fp16" if torch.cuda.is_available() else "no"
        return settings


def validate(settings: BenchSettings) -> list[str]:
    """Every problem with resolved settings, one line each, naming the option."""
    problems = []
    if settings.shape not in SHAPES:
        problems.append(f"--shape must be one of {', '.join(SHAPES)}, got {settings.shape!r}")
    for name in ("repeats", "reference_eval_batch_size", "prep_num_proc", *SHAPE_SIZES):
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


def parse_settings(argv: list[str] | None = None, description: str | None = None) -> BenchSettings:
    """`--field value` for every field of BenchSettings (`--field/--no-field` for the flags); each option's help
    is its field's docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    docs = field_docs(BenchSettings)
    for field in dataclasses.fields(BenchSettings):
        default = field.default
        help_text = f"{docs[field.name]} (default: {default!r})".replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(f"--{field.name}", type=type(default), default=default, help=help_text)
    return BenchSettings(**vars(parser.parse_args(argv)))
