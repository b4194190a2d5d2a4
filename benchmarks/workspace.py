"""The shared workspace: the folder the parent process fills once (model, manifests, both sides' prepared data,
untimed) and every child process reads."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import GenerationConfig

from benchmarks.reference_recipe import numpy_path_feature_extractor, reference_prepare
from benchmarks.settings import LANGUAGE, SHAPES, TASK, BenchSettings
from loop.config import RunConfig
from loop.config.loading import load_config
from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split, read_manifest, write_manifest
from loop.data.splits import build_datasets
from loop.model.loading import load_processor
from loop.model.tiny import build_tiny_whisper

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
BPE_VOCAB_SIZE = 400  # regular tokens of the corpus-trained tokenizer, as in assets/tiny-whisper-hi
SIDES = ("loop", "reference")
PACKED = "packed"  # our training on packed rows: an extra process per repeat, not a side of the comparison
DYNAMIC = "dynamic"  # our training and evaluation at the dynamic encoder window: likewise an extra process


@dataclass
class Workspace:
    """The folder the parent fills and the children read: model, manifests, both sides' prepared tables."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def manifest_dir(self) -> Path:
        """`<split>.csv` manifests: train, eval and (with packing) packed."""
        return self.root / "manifests"

    @property
    def loop_cache(self) -> Path:
        """Our prepared tables (`data.cache_dir`)."""
        return self.root / "loop-cache"

    @property
    def reference_data(self) -> Path:
        """The reference's prepared tables, `train.arrow` and `eval.arrow`."""
        return self.root / "reference-data"

    @property
    def clip_facts(self) -> Path:
        """JSON with the training clips' mean duration (the Trainer never sees durations)."""
        return self.root / "clips.json"


def corpus_clips(splits: tuple[str, ...]) -> list[dict]:
    """Rows of the shipped synthetic corpus' splits, in order."""
    folder = find_common_voice_dir(str(CORPUS))
    return [row for split in splits for row in read_common_voice_split(folder, split, SkipLog())]


def manifest_rows(workspace: Workspace, split: str) -> datasets.Dataset:
    """A manifest split with the blog's dataset columns (`audio_path`, `sentence`), plus the clip `id`."""
    rows = read_manifest(workspace.manifest_dir / f"{split}.csv", "audio", "sentence", SkipLog())
    return datasets.Dataset.from_list(
        [{"id": row["id"], "audio_path": row["audio_path"], "sentence": row["text"]} for row in rows]
    )


def build_model(settings: BenchSettings, folder: Path) -> Path:
    """The shape's random-init Whisper with the corpus-trained tokenizer. Left alone it would emit timestamp
    tokens, after which transformers' Whisper `generate` decodes further "segments" past `max_length`; its
    generation config suppresses them, so both sides decode one segment of at most `generation_max_length`."""
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


def loop_config(settings: BenchSettings, workspace: Workspace, *overrides: str) -> RunConfig:
    """Our run configuration for the benchmark: the manifests, the model, the sizes; `overrides` as on the
    command line."""
    steps = settings.warmup_steps + settings.timed_steps
    return load_config(None, [
        f"--model.name_or_path={workspace.model_dir}",
        f"--model.language={LANGUAGE}",
        f"--model.task={TASK}",
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


def packed_config(settings: BenchSettings, workspace: Workspace) -> RunConfig:
    """Our run configuration with the packed manifest as training data, packed to the shape's audio window."""
    return loop_config(settings, workspace, f"--data.train_splits={PACKED}",
                       f"--data.pack_to_seconds={SHAPES[settings.shape].chunk_length_s}")


def dynamic_config(settings: BenchSettings, workspace: Workspace) -> RunConfig:
    """Our run configuration at the dynamic encoder window, with length-grouped training batches."""
    return loop_config(settings, workspace, "--model.encoder_window=dynamic", "--train.group_by_length=true")


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
    processor = load_processor(str(workspace.model_dir), LANGUAGE, TASK)
    max_label_length = SHAPES[settings.shape].max_target_positions
    data = build_datasets(loop_config(settings, workspace), processor, max_label_length)
    if settings.packing:  # every training clip of the corpus, so the packed rows fill the timed steps
        write_manifest(workspace.manifest_dir / f"{PACKED}.csv", corpus_clips(("train", "dev")))
        build_datasets(packed_config(settings, workspace), processor, max_label_length)
    workspace.clip_facts.write_text(json.dumps({"train_mean_duration_s": statistics.fmean(data.train["duration"])}))
    numpy_path = numpy_path_feature_extractor(processor.feature_extractor)
    for split in ("train", "eval"):
        reference_prepare(manifest_rows(workspace, split), numpy_path, processor.tokenizer,
                          workspace.reference_data / f"{split}.arrow", settings.prep_num_proc)
    return workspace
