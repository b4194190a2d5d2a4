"""Shared by the evaluation, report, model card and demo tests: a small saved model that decodes fast and says
something, and in-process runs of scripts/evaluate.py."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import PROJECT, corpus_rows, reset_accelerate

DECODE_MAX_LENGTH = 20  # tokens, prompt included: keeps every generation call short
WEIGHT_SCALE = 30.0  # random init (std 0.02) barely lets the audio reach the decoder; scaled up, it does


def build_decoding_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random 5-s-window Whisper saved the way the loop saves `best/` (language, task and max length in its
    generation config), standing in for a trained checkpoint (training one takes minutes on 2 cores): its weight
    matrices are scaled up so that every clip gets a different transcript, and every special token but
    <|endoftext|> is suppressed, since random weights would otherwise emit timestamp and language tokens that
    decode to an empty string. The result is deterministic, different per clip, and fast to decode."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    from loop.config import EvalConfig
    from loop.model import set_generation_settings
    from loop.tiny_model import build_tiny_whisper

    if (folder / "model.safetensors").exists():
        return folder
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    # tests.helpers.build_fast_model's shape, with a seed of its own
    build_tiny_whisper(sentences, folder, vocab_size=600, chunk_length_s=5, d_model=64, layers=2, heads=2,
                       max_target_positions=128, seed=seed)
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


def load_script(name: str):
    """scripts/<name>.py as a module, so tests call its main() in-process (no second interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", PROJECT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def run_evaluate_script(*argv: str) -> int:
    """scripts/evaluate.py's main() in this process; Accelerate's state is reset afterwards."""
    try:
        return load_script("evaluate").main([str(a) for a in argv])
    finally:
        reset_accelerate()


@contextmanager
def one_torch_thread():
    """Runs torch on one thread: these models are so small that a second thread only adds synchronisation, and
    on a busy machine OpenMP's spin-waiting threads make every tiny matmul 20 times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
