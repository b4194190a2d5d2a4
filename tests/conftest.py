"""Shared fixtures: the shipped corpus and tiny model, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shipped synthetic corpus' locale folder (train.tsv, dev.tsv, test.tsv, clips/)."""
    return PROJECT / "assets" / "cv-corpus-17.0-synthetic" / "hi"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return PROJECT / "assets" / "tiny-whisper-hi"


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from loop.model import load_processor

    return load_processor(str(tiny_model_dir), "hindi", "transcribe")
