"""Shared fixtures: the shipped corpus and tiny model, copies of the corpus (clean or broken), a cache folder; offline."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.corpora import SKIPPED, BadCorpus, add_bad_rows

# Before anything imports `datasets` or `huggingface_hub`: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `load_dataset` on a local folder writes Arrow files to the datasets cache: keep them out of the user's ~/.cache.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="whisper-loop-tests-hf-")
os.environ.setdefault("HF_DATASETS_CACHE", _DATASETS_CACHE)

PROJECT = Path(__file__).resolve().parent.parent
CORPUS_ROOT = PROJECT / "assets" / "cv-corpus-17.0-synthetic"
SPLITS = ("train", "dev", "test")
SPLIT_SIZES = {"train": 308, "dev": 30, "test": 30}  # rows of the shipped corpus' TSVs (assets/README.md)


def pytest_unconfigure(config):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    """The shipped synthetic release root (`cv-corpus-17.0-synthetic/`, holding `hi/`)."""
    return CORPUS_ROOT


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shipped synthetic corpus' locale folder (train.tsv, dev.tsv, test.tsv, clips/)."""
    return CORPUS_ROOT / "hi"


TINY_MODELS = {"v2": "tiny-whisper-hi", "v3": "tiny-whisper-v3-hi"}  # 80 mel bins / 128 and <|yue|> (assets/README.md)


@pytest.fixture(scope="session")
def tiny_model_dir(request) -> Path:
    """assets/tiny-whisper-hi (v2's layout); a test marked `@pytest.mark.parametrize("tiny_model_dir", ["v2", "v3"],
    indirect=True)` runs on assets/tiny-whisper-v3-hi (large-v3's) too."""
    return PROJECT / "assets" / TINY_MODELS[getattr(request, "param", "v2")]


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from loop.model.loading import load_processor

    return load_processor(str(tiny_model_dir), "hindi", "transcribe")


@pytest.fixture(scope="session")
def max_target_positions(tiny_model_dir) -> int:
    """The tiny model's longest label sequence (256), read from its config.json as scripts/prepare_data.py does."""
    from transformers import WhisperConfig

    return WhisperConfig.from_pretrained(str(tiny_model_dir)).max_target_positions


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    """A prepared-data cache (`data.cache_dir`) shared by the whole session, so the shipped corpus is prepared once."""
    return tmp_path_factory.mktemp("prepared-cache")


def tsv_lines(locale_dir: Path, split: str) -> tuple[str, list[str]]:
    """(header, rows) of `<locale_dir>/<split>.tsv` as text lines."""
    lines = (Path(locale_dir) / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    return lines[0], lines[1:]


@pytest.fixture
def corpus_copy(tmp_path, corpus_dir):
    """Factory: `corpus_copy(train=12, dev=0, test=4)` copies the first rows of each split and their clips into a
    fresh `<tmp>/cv-corpus-copy-N/hi/` (header kept, v17 layout) and returns that locale folder. Tests may change
    the copy freely: the shipped assets stay untouched."""
    made = []

    def make(train: int = 12, dev: int = 0, test: int = 4) -> Path:
        folder = tmp_path / f"cv-corpus-copy-{len(made)}" / "hi"
        (folder / "clips").mkdir(parents=True)
        for split, count in (("train", train), ("dev", dev), ("test", test)):
            header, rows = tsv_lines(corpus_dir, split)
            for row in rows[:count]:
                clip = row.split("\t")[1]
                shutil.copy(corpus_dir / "clips" / clip, folder / "clips" / clip)
            (folder / f"{split}.tsv").write_text("\n".join([header, *rows[:count]]) + "\n", encoding="utf-8")
        made.append(folder)
        return folder

    return make


@pytest.fixture
def broken_corpus(corpus_copy) -> BadCorpus:
    """12 good train rows, interleaved with a missing clip, a 0-byte file, random bytes, a 12-s WAV (over the tiny
    model's 5-s window), a blank transcript, a transcript over 256 label tokens, a duplicate row, a row with one
    field too many, a row with an empty path and a row that is not UTF-8 (tests/corpora.py). dev.tsv is empty,
    test.tsv has 4 good rows.
    """
    return add_bad_rows(corpus_copy(train=12, dev=0, test=4), SKIPPED, splits=["train"])


# Fixtures of the training, fault, evaluation, demo and model card tests (kept apart from the corpus builders above).


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """After every test, Accelerate's state singletons are reset (a no-op unless the test built an Accelerator:
    in-process runs, scripts' main()), so nothing carries over to the next test and no test has to remember."""
    yield
    from tests.helpers import reset_accelerate

    reset_accelerate()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("single_thread")`): its models are
    so small that a second thread only adds synchronisation, and on a busy machine OpenMP's spin-waiting threads
    make every tiny matmul 20 times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# `fast_model` and `decoding_checkpoint` have v2's layout (80 mel bins) unless a test asks for both shapes with
# `@pytest.mark.parametrize("fast_model", ["v2", "v3"], indirect=True)`: then it also runs on a v3-shaped one
# (128 mel bins, <|yue|> and the task and timestamp ids after it moved by one), each built once per session.


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory, request) -> Path:
    """`tests.helpers.build_fast_model`'s Whisper, built once per shape: training tests start from it."""
    from tests.helpers import build_fast_model

    shape = getattr(request, "param", "v2")
    return build_fast_model(tmp_path_factory.mktemp(f"fast-model-{shape}"), shape=shape)


@pytest.fixture(scope="session")
def decoding_checkpoint(tmp_path_factory, request) -> Path:
    """`tests.helpers.build_decoding_checkpoint`'s saved model, built once per shape: a stand-in for a trained best/."""
    from tests.helpers import build_decoding_checkpoint

    shape = getattr(request, "param", "v2")
    return build_decoding_checkpoint(tmp_path_factory.mktemp(f"decoding-checkpoint-{shape}"), shape=shape)
