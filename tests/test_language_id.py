"""Language identification: our one decoder step over an evaluation's encoder output picks the same language as
transformers' own `detect_language`, and reads the ids from the model's generation config."""

import pytest
import torch

from loop.eval.language_id import language_id_share, language_token_ids
from loop.model.loading import load_for_inference
from tests.reference import detect_languages


def test_detected_languages_match_transformers_detect_language(tiny_model_dir):
    model, processor = load_for_inference(str(tiny_model_dir))
    torch.manual_seed(0)
    features = torch.randn(4, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    encoder_outputs = model.get_encoder()(features)
    ours = detect_languages(model, encoder_outputs)
    theirs = model.detect_language(input_features=features, num_segment_frames=features.shape[-1]).tolist()
    id_to_code = {token_id: code for code, token_id in language_token_ids(model.generation_config).items()}
    assert ours == [id_to_code[token_id] for token_id in theirs]
    assert all(code in id_to_code.values() for code in ours)


def test_language_ids_come_from_the_generation_config(tiny_model_dir):
    model, _ = load_for_inference(str(tiny_model_dir))
    ids = language_token_ids(model.generation_config)
    assert ids["hi"] == model.generation_config.lang_to_id["<|hi|>"] and ids["en"] == model.generation_config.lang_to_id["<|en|>"]
    model.generation_config.lang_to_id = {}
    with pytest.raises(ValueError, match="not a multilingual Whisper"):
        language_token_ids(model.generation_config)


def test_language_id_share():
    assert language_id_share(["hi", "hi", "en", "ur"], "hi") == 50.0
    assert language_id_share([], "hi") == 0.0
