"""Building blocks for the tests (the fixtures that use them are in conftest.py): two small Whispers, one fast to
train and one that decodes fast and says something, rows of the shipped corpus, run configs, the scripts run
in-process or as child processes, TensorBoard scalars, and Accelerate's state reset between runs."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from loop.config.loading import load_config
from loop.data.sources import SkipLog, find_common_voice_dir, read_common_voice_split
from loop.model.tiny import build_tiny_whisper

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
DECODE_MAX_LENGTH = 20  # tokens, prompt included: keeps every generation call of the decoding checkpoint short
WEIGHT_SCALE = 30.0  # random init (std 0.02) barely lets the audio reach the decoder; scaled up, it does


def corpus_rows(split: str) -> list[dict]:
    return read_common_voice_split(find_common_voice_dir(str(CORPUS)), split, SkipLog())


def build_fast_model(folder: Path, seed: int = 0, shape: str = "v2") -> Path:
    """A smaller, shorter-window Whisper than assets/tiny-whisper-hi (5-s window: every shipped clip is under
    4 s), so training tests take seconds; `shape` v2 (80 mel bins) or v3 (128, <|yue|>: loop.model.tiny.SHAPES)."""
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    return build_tiny_whisper(sentences, folder, vocab_size=600, chunk_length_s=5, d_model=64, layers=2, heads=2,
                              max_target_positions=128, seed=seed, shape=shape)


def build_decoding_checkpoint(folder: Path, seed: int = 0, shape: str = "v2") -> Path:
    """A random 5-s-window Whisper (`build_fast_model`'s shape) saved the way the loop saves `best/` (language,
    task and max length in its generation config), standing in for a trained checkpoint (training one takes
    minutes on 2 cores): its weight matrices are scaled up so that every clip gets a different transcript, and
    every special token but <|endoftext|> is suppressed, since random weights would otherwise emit timestamp and
    language tokens that decode to an empty string. The result is deterministic, different per clip, and fast to
    decode."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    from loop.config import EvalConfig
    from loop.model.loading import set_generation_settings

    build_fast_model(folder, seed, shape)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "layer_norm" not in name and "embed_positions" not in name:
                parameter.mul_(WEIGHT_SCALE)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    set_generation_settings(model, "hindi", "transcribe", EvalConfig(generation_max_length=DECODE_MAX_LENGTH))
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    special = set(tokenizer.convert_tokens_to_ids(list(tokenizer.get_added_vocab())))
    model.generation_config.suppress_tokens = sorted(special - {end})
    model.save_pretrained(folder)
    return folder


class StopAt:
    """Stands in for a SIGTERM arriving once `run.state.step` reaches `step`."""

    def __init__(self, run, step):
        self.run, self.step = run, step

    @property
    def signal_name(self):
        return "SIGTERM" if self.run.state.step >= self.step else ""


def run_config(output_dir: Path, model_dir: Path, cache_dir: Path, *overrides: str):
    """The quickstart preset pointed at a test model, quiet and small; `overrides` as on the command line."""
    base = [
        f"--model.name_or_path={model_dir}",
        f"--data.cache_dir={cache_dir}",
        "--data.num_proc=1",
        "--train.warmup_steps=0",
        "--train.logging_steps=1",
        "--eval.eval_on_start=false",
        "--eval.guard_sets=[]",  # the preset's English guard set costs every evaluation time; tests/test_guard_sets.py has it
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
    """Each in-process run builds its own Accelerator; its state singletons must not carry over to the next.
    conftest.py calls this after every test; a test that builds two runs calls it between them."""
    state = sys.modules.get("accelerate.state")
    if state is None:  # nothing has imported Accelerate yet: there is no state to reset
        return
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()


def load_script(name: str):
    """scripts/<name>.py as a module, so tests call its main() in-process (no second interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", PROJECT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def run_evaluate_script(*argv: str) -> int:
    """scripts/evaluate.py's main() in this process; Accelerate's state is reset afterwards, so one test can run
    it several times."""
    try:
        return load_script("evaluate").main([str(a) for a in argv])
    finally:
        reset_accelerate()


def script_command(name: str, *args, processes: int = 1) -> list[str]:
    """The command line of scripts/<name>.py with `args`: run directly, or with `processes` > 1 under
    `accelerate launch` as that many CPU processes (gloo)."""
    script = str(PROJECT / "scripts" / f"{name}.py")
    if processes == 1:
        return [sys.executable, script, *map(str, args)]
    return [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={processes}", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", "--multi_gpu", script, *map(str, args)]


def child_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a script run as a child process: this checkout's `loop` first on the path (not the
    editable install's), `threads` OpenMP threads per process, and `extra` variables."""
    return {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": str(threads), **extra}


def docs_snippet(page: str, marker: str, replacements: dict[str, str]) -> str:
    """The fenced code block of docs/`page` that contains `marker`, with each key of `replacements` (a path or URL
    the page uses as an example) replaced by its value, so a test runs the block as the page shows it."""
    text = (PROJECT / "docs" / page).read_text(encoding="utf-8")
    blocks = [block for block in re.findall(r"```\w*\n(.*?)```", text, re.DOTALL) if marker in block]
    assert len(blocks) == 1, f"docs/{page}: {len(blocks)} code blocks contain {marker!r}"
    snippet = blocks[0]
    for old, new in replacements.items():
        assert old in snippet, f"docs/{page}: the block with {marker!r} no longer names {old!r}"
        snippet = snippet.replace(old, new)
    return snippet


def kill_9_when(command: list[str], ready, timeout: float = 300, env: dict | None = None) -> None:
    """Starts `command` (a script's child process, in `env`: default `child_env()`) and kills it with SIGKILL as
    soon as `ready()` is true; fails if it ends first or `timeout` seconds pass."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=env or child_env(), cwd=PROJECT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert process.poll() is None and time.time() < deadline, "the process ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
