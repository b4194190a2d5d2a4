"""Building blocks for training tests: a small fast Whisper, manifests over the shipped clips, run configs."""

from __future__ import annotations

from pathlib import Path

from loop.config_loading import load_config
from loop.sources import SkipLog, find_common_voice_dir, read_common_voice_split
from loop.tiny_model import build_tiny_whisper

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"


def corpus_rows(split: str) -> list[dict]:
    return read_common_voice_split(find_common_voice_dir(str(CORPUS)), split, SkipLog())


def build_fast_model(folder: Path) -> Path:
    """A smaller, shorter-window Whisper than assets/tiny-whisper-hi (5-s window: every shipped clip is under
    4 s), so training tests take seconds."""
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    return build_tiny_whisper(sentences, folder, vocab_size=600, chunk_length_s=5, d_model=64, layers=2, heads=2,
                              max_target_positions=128, seed=0)


def run_config(output_dir: Path, model_dir: Path, cache_dir: Path, *overrides: str):
    """The quickstart preset pointed at a test model, quiet and small; `overrides` as on the command line."""
    base = [
        f"--model.name_or_path={model_dir}",
        f"--data.cache_dir={cache_dir}",
        "--data.num_proc=1",
        "--train.warmup_steps=0",
        "--train.logging_steps=1",
        "--eval.eval_on_start=false",
    ]
    return load_config("quickstart", [*base, *overrides], str(output_dir))


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar over every event file below `log_dir` (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                values[event.step] = event.value
    return values


def reset_accelerate() -> None:
    """Each in-process run builds its own Accelerator; its state singletons must not carry over to the next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
