"""The two tiny Whispers, v2-shaped (assets/tiny-whisper-hi) and v3-shaped (assets/tiny-whisper-v3-hi): their ids
really differ as the Hub's do, and labels, features, generation, scripts/evaluate.py and the demo each follow the
model's own files. (The exact-resume training test runs on both shapes too: tests/test_train.py, `fast_model` "v3".)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loop.config import ModelConfig
from loop.data.collator import SpeechSeq2SeqCollator
from loop.model.features import LogMel
from loop.model.loading import ModelLoadError, load_for_inference, load_model
from loop.model.token_layout import TokenLayout
from tests.conftest import PROJECT, TINY_MODELS
from tests.helpers import DECODE_MAX_LENGTH, run_evaluate_script
from tests.reference import read_predictions_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")
SHAPES = ["v2", "v3"]
# The Hub's ids less <|endoftext|> (50257 in both generations), from openai/whisper-small's and
# openai/whisper-large-v3's tokenizer and generation config: the tiny models' BPE is smaller, the layout the same.
HUB_OFFSETS = {
    "v2": {"start": 1, "hi": 19, "translate": 101, "transcribe": 102, "no_timestamps": 106, "first_timestamp": 107},
    "v3": {"start": 1, "hi": 19, "yue": 101, "translate": 102, "transcribe": 103, "no_timestamps": 107,
           "first_timestamp": 108},
}


def tiny(shape: str) -> str:
    return str(PROJECT / "assets" / TINY_MODELS[shape])


@pytest.fixture(scope="module")
def loaded():
    """shape -> (model, processor, layout) of the shipped tiny model, loaded for fine-tuning in Hindi."""
    result = {}
    for shape in SHAPES:
        model, processor = load_model(ModelConfig(name_or_path=tiny(shape)))
        result[shape] = model, processor, TokenLayout.of(processor)
    return result


def test_the_two_tiny_models_differ_as_v2_and_v3_do(loaded):
    (v2_model, _, v2), (v3_model, _, v3) = loaded["v2"], loaded["v3"]
    for shape, layout in (("v2", v2), ("v3", v3)):
        offsets = {"start": layout.start, "hi": layout.languages["<|hi|>"], "translate": layout.translate,
                   "transcribe": layout.transcribe, "no_timestamps": layout.no_timestamps,
                   "first_timestamp": layout.first_timestamp}
        if "<|yue|>" in layout.languages:
            offsets["yue"] = layout.languages["<|yue|>"]
        assert {k: v - layout.end for k, v in offsets.items()} == HUB_OFFSETS[shape], shape
    assert len(v2.languages) == 99 and len(v3.languages) == 100 and "<|yue|>" not in v2.languages
    assert v3.languages["<|yue|>"] == v2.translate  # the new token takes <|translate|>'s place ...
    for name in ("translate", "transcribe", "no_timestamps", "first_timestamp"):  # ... and moves what follows
        assert getattr(v3, name) == getattr(v2, name) + 1, name
    for _, processor, layout in loaded.values():
        assert processor.tokenizer.convert_tokens_to_ids("<|0.00|>") == layout.first_timestamp
    assert (v2.num_mel_bins, v3.num_mel_bins) == (80, 128)
    assert (v2_model.config.num_mel_bins, v3_model.config.num_mel_bins) == (80, 128)
    assert v3_model.config.vocab_size == v2_model.config.vocab_size + 1
    for model, layout in ((v2_model, v2), (v3_model, v3)):  # each generation config carries its own ids
        settings = model.generation_config
        assert settings.task_to_id == {"transcribe": layout.transcribe, "translate": layout.translate}
        assert settings.no_timestamps_token_id == layout.no_timestamps
        assert settings.lang_to_id == layout.languages
        # as the Hub's: <|startoftranscript|>, the task tokens, <|startoflm|>, <|startofprev|>, <|nospeech|>
        assert settings.suppress_tokens == [layout.start, *range(layout.translate, layout.no_timestamps)]


@pytest.mark.parametrize("shape", SHAPES)
def test_labels_and_features_follow_the_models_own_files(shape, loaded, corpus_dir, session_cache_dir):
    """Prepared labels start with the model's own prefix and end with its <|endoftext|>, the collator strips its
    <|startoftranscript|>, the features have its mel bins, and the model scores the batch."""
    from loop.config.loading import load_config
    from loop.data.splits import build_eval_split
    from loop.model.loss import token_losses

    model, processor, layout = loaded[shape]
    config = load_config(None, [f"--model.name_or_path={tiny(shape)}", f"--data.path={corpus_dir}",
                                "--data.max_eval_samples=4", f"--data.cache_dir={session_cache_dir}"])
    table, _ = build_eval_split(config, processor, model.config.max_target_positions)
    prefix = layout.prefix("hi", "transcribe")
    assert all(labels[:4] == prefix and labels[-1] == layout.end for labels in table["labels"])
    batch = SpeechSeq2SeqCollator(model.config.decoder_start_token_id)(
        [{**table[i], "index": i} for i in range(len(table))])
    assert (batch["labels"][:, :3] == torch.tensor(prefix[1:])).all()
    batch["input_features"] = LogMel(processor.feature_extractor)(batch["audio"])
    assert batch["input_features"].shape[1:] == (layout.num_mel_bins, 500)
    with torch.no_grad():
        assert torch.isfinite(token_losses(model.eval(), batch)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_generation_starts_from_the_models_own_prefix(shape, loaded):
    """`transcribe` (the loop's, evaluate.py's and the demo's decoding) feeds the decoder the model's own
    <|startoftranscript|><|hi|><|transcribe|><|notimestamps|> and never emits a suppressed task token."""
    from loop.model.decoding import transcribe

    model, processor, layout = loaded[shape]
    model.eval().generation_config.max_length = 8
    first_inputs = []

    def record(module, args, kwargs):
        if not first_inputs:
            first_inputs.append(kwargs["input_ids"].tolist())

    handle = model.model.decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        features = torch.randn(2, layout.num_mel_bins, 500, generator=torch.Generator().manual_seed(0))
        texts = transcribe(model, features, processor.tokenizer)
    finally:
        handle.remove()
    assert first_inputs == [[layout.prefix("hi", "transcribe")] * 2] and len(texts) == 2


def test_a_language_the_tokenizer_lacks_is_refused():
    """Cantonese (<|yue|>) exists from large-v3 on: a v2 model refuses it (transformers' prefix arithmetic would
    silently give <|translate|>), a v3 model takes it."""
    with pytest.raises(ModelLoadError, match=r"has no <\|yue\|> token \(99 language tokens"):
        load_model(ModelConfig(name_or_path=tiny("v2"), language="cantonese"))
    _, processor = load_model(ModelConfig(name_or_path=tiny("v3"), language="cantonese"))
    layout = TokenLayout.of(processor)
    assert processor.tokenizer.prefix_tokens == [layout.start, layout.languages["<|yue|>"], layout.transcribe,
                                                 layout.no_timestamps]


def test_a_processor_of_the_other_generation_is_refused(tmp_path):
    """v3 weights beside a v2 processor (a folder put together by hand): loading names the mel bins and the ids."""
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny("v3"), mixed)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PROJECT / "assets" / TINY_MODELS["v2"] / name, mixed / name)
    with pytest.raises(ModelLoadError, match="makes 80 mel bins, the model takes 128.*task_to_id"):
        load_for_inference(str(mixed))


@pytest.mark.parametrize("decoding_checkpoint", ["v3"], indirect=True)
def test_evaluate_and_the_demo_on_a_v3_checkpoint(tmp_path, decoding_checkpoint, corpus_dir, session_cache_dir):
    """scripts/evaluate.py on a v3-shaped checkpoint, compared with the v2-shaped tiny model on the same utterances
    (prepared again for it: other ids, other mel bins), and the demo's transcribe_file giving the same hypotheses."""
    from loop.ship.demo import Transcriber

    out = tmp_path / "evaluated"
    code = run_evaluate_script("--model", decoding_checkpoint, "--data.path", corpus_dir, "--data.eval_split", "test",
                               "--data.max_eval_samples=4", f"--data.cache_dir={session_cache_dir}",
                               "--data.num_proc=1",
                               "--output_dir", out, "--compare", tiny("v2"),
                               f"--eval.generation_max_length={DECODE_MAX_LENGTH}", "--batch_size=2")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_utterances"] == metrics["compare"]["num_utterances"] == 4
    rows = read_predictions_jsonl(out / "predictions.jsonl")
    compared = read_predictions_jsonl(out / "compare_predictions.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in compared]
    assert len({r["hypothesis"] for r in rows}) > 1
    demo = Transcriber(decoding_checkpoint)
    assert demo.processor.feature_extractor.feature_size == 128
    assert {r["id"]: demo.transcribe_file(r["audio_path"])[0] for r in rows} == {r["id"]: r["hypothesis"] for r in rows}
