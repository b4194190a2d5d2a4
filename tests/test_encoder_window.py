"""The dynamic encoder window (loop/model/encoder_window.py): a full window gives the stock encoder's outputs bit for bit,
a short one the outputs of a stock encoder built for that window; the model saves and loads as stock Whisper,
records its window, generates from short features; `window_frames` at its edges; `load_model` applies the option.
On the tiny model (80 mel bins, a 5-s window of 500 frames) and a random 128-mel-bin Whisper (30 s, 3000 frames)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from loop.config import ModelConfig
from loop.model.decoding import generate_ids
from loop.model.encoder_window import (
    ShortInputWhisperEncoder,
    allow_short_inputs,
    full_window_frames,
    generation_inputs,
    record_encoder_window,
    saved_encoder_window,
    window_frames,
)
from loop.model.loading import load_for_inference, load_model, load_weights

HOP, RATE = 160, 16000


def random_whisper_128(seed: int = 0) -> WhisperForConditionalGeneration:
    """A random large-v3-shaped Whisper in miniature: 128 mel bins, the full 30-s window of 3000 frames."""
    torch.manual_seed(seed)
    config = WhisperConfig(num_mel_bins=128, dropout=0.1, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                           decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           vocab_size=300, max_target_positions=32, max_source_positions=1500,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture(params=["tiny", "random128"])
def model(request, tiny_model_dir):
    """A fresh model of each kind, with dropout 0.1 (tests change their encoder's class)."""
    return load_weights(str(tiny_model_dir), dropout=0.1).eval() if request.param == "tiny" else random_whisper_128()


def features(model, frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.num_mel_bins, frames, generator=generator)


def stock_encoder_for_window(encoder: WhisperEncoder, frames: int) -> WhisperEncoder:
    """A stock `WhisperEncoder` built for a window of `frames` frames, holding `encoder`'s weights and the first
    frames/2 position embeddings: the reference for a short input."""
    config = copy.deepcopy(encoder.config)
    config.max_source_positions = frames // 2
    reference = WhisperEncoder(config).eval()
    state = {name: value[: frames // 2] if name == "embed_positions.weight" else value
             for name, value in encoder.state_dict().items()}
    reference.load_state_dict(state)
    return reference


def test_full_window_gives_the_stock_encoders_outputs_bit_for_bit(model):
    """At the full window (500 frames for the tiny model, 3000 for the 128-bin one) the swapped encoder is the
    stock one: same last hidden state and hidden states, in eval mode and in training mode with dropout."""
    full = features(model, full_window_frames(model))
    stock = model.get_encoder()
    expected = stock(full, output_hidden_states=True)
    stock.train()
    torch.manual_seed(1)
    expected_train = stock(full).last_hidden_state
    stock.eval()
    allow_short_inputs(model)
    encoder = model.get_encoder()
    assert type(encoder) is ShortInputWhisperEncoder
    got = encoder(full, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert len(got.hidden_states) == len(expected.hidden_states) == model.config.encoder_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
    encoder.train()
    torch.manual_seed(1)
    assert torch.equal(encoder(full).last_hidden_state, expected_train)


@pytest.mark.parametrize("frames", [2, 100, 498])
def test_short_input_equals_a_stock_encoder_built_for_that_window(model, frames):
    """T frames -> T/2 positions: exactly what a stock encoder with `max_source_positions` T/2 and the first T/2
    position embeddings computes, hidden states included."""
    short = features(model, frames)
    stock = stock_encoder_for_window(model.get_encoder(), frames)
    reference = stock(short, output_hidden_states=True)
    allow_short_inputs(allow_short_inputs(model))  # twice: no harm
    encoder = model.get_encoder()
    got = encoder(short, output_hidden_states=True)
    assert got.last_hidden_state.shape == (2, frames // 2, model.config.d_model)
    assert torch.equal(got.last_hidden_state, reference.last_hidden_state)
    assert len(got.hidden_states) == model.config.encoder_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, reference.hidden_states))
    for module in (stock, encoder):  # training: dropout 0.1 and LayerDrop draw the same numbers
        module.train()
        module.layerdrop = 0.5
    outputs = []
    for module in (stock, encoder):
        torch.manual_seed(3)
        outputs.append(module(short).last_hidden_state)
    assert torch.equal(*outputs)


def test_a_prefix_keeps_its_embeddings_but_not_its_encoding(tiny_model_dir):
    """The features of a short window are a prefix of the full window's: the convolutions and position embeddings
    give the same encoder input except at the last position (whose conv window reaches past the cut), while the
    layers' outputs differ, since attention sees only the prefix. (A model trained on full windows has never seen
    such a context: decoding with a window it was not trained with is defined, not equivalent.)"""
    tiny = load_weights(str(tiny_model_dir)).eval()
    full = features(tiny, 500)
    stock = tiny.get_encoder()(full, output_hidden_states=True)
    allow_short_inputs(tiny)
    short = tiny.get_encoder()(full[..., :200], output_hidden_states=True)
    torch.testing.assert_close(short.hidden_states[0][:, :99], stock.hidden_states[0][:, :99], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(short.hidden_states[0][:, 99], stock.hidden_states[0][:, 99])
    assert not torch.allclose(short.last_hidden_state, stock.last_hidden_state[:, :100])


@pytest.mark.parametrize("frames", [0, 1, 99])
def test_odd_or_empty_inputs_are_refused(model, frames):
    allow_short_inputs(model)
    expected = f"even number of frames up to {full_window_frames(model)}, but found {frames}"
    with pytest.raises(ValueError, match=expected):
        model.get_encoder()(features(model, frames))


def test_longer_than_the_window_is_refused_as_by_the_stock_encoder(model):
    allow_short_inputs(model)
    with pytest.raises(ValueError, match="Whisper expects the mel input features to be of length"):
        model.get_encoder()(features(model, full_window_frames(model) + 2))


def test_training_forward_and_backward_on_a_short_window(tiny_model_dir):
    """The model's own forward (SpecAugment, the loss, gradient checkpointing) runs on short features."""
    model = load_weights(str(tiny_model_dir), apply_spec_augment=True, mask_time_prob=0.5)
    allow_short_inputs(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    labels = torch.tensor([[5, 6, 7, 400], [8, 9, 400, -100]])
    loss = model(input_features=features(model, 120), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.encoder.conv1.weight.grad.abs().sum() > 0


def test_saves_and_loads_as_an_ordinary_whisper_checkpoint(tiny_model_dir, tmp_path):
    """The same files, weight names and architectures as the stock model's; config.json differs by the recorded
    window only, and `from_pretrained` loads the stock classes."""
    stock, swapped = load_weights(str(tiny_model_dir)), load_weights(str(tiny_model_dir))
    allow_short_inputs(swapped)
    record_encoder_window(swapped, "dynamic", 0.5)
    stock.save_pretrained(tmp_path / "stock")
    swapped.save_pretrained(tmp_path / "swapped")
    assert sorted(os.listdir(tmp_path / "stock")) == sorted(os.listdir(tmp_path / "swapped"))

    def weights(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}

    stock_weights, swapped_weights = weights(tmp_path / "stock"), weights(tmp_path / "swapped")
    assert stock_weights.keys() == swapped_weights.keys()
    assert all(torch.equal(stock_weights[name], swapped_weights[name]) for name in stock_weights)
    stock_config = json.loads((tmp_path / "stock" / "config.json").read_text())
    swapped_config = json.loads((tmp_path / "swapped" / "config.json").read_text())
    assert swapped_config.pop("encoder_window") == "dynamic"
    assert swapped_config.pop("encoder_window_multiple_s") == 0.5
    assert swapped_config == stock_config
    assert stock_config["architectures"] == ["WhisperForConditionalGeneration"]
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "swapped")
    assert type(loaded.get_encoder()) is WhisperEncoder
    assert saved_encoder_window(loaded) == ("dynamic", 0.5)


def test_saved_encoder_window_defaults_and_full_removes_the_record(tiny_model_dir, tmp_path):
    model = load_weights(str(tiny_model_dir))
    assert saved_encoder_window(model) == ("full", 1.0)
    record_encoder_window(model.config, "dynamic", 2)
    assert saved_encoder_window(model.config) == ("dynamic", 2.0)
    record_encoder_window(model, "full")
    model.save_pretrained(tmp_path)
    assert "encoder_window" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="'partial' is not one of full, dynamic"):
        record_encoder_window(model, "partial")
    model.config.encoder_window = "partial"
    with pytest.raises(ValueError, match="config.json has encoder_window 'partial'"):
        saved_encoder_window(model)


def test_generate_zero_pads_short_input_features_to_the_full_window(tiny_model_dir):
    """What transformers does (the reason for `generation_inputs`): `generate(input_features=...)` shorter than the
    window is short-form transcription, but its encoder sees the features zero-padded to the full window."""
    model = allow_short_inputs(load_weights(str(tiny_model_dir)).eval())
    seen = []
    model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["input_features"]).shape[-1]),
        with_kwargs=True)
    model.generate(input_features=features(model, 200), language="hi", task="transcribe", max_length=8)
    assert seen == [500]
    seen.clear()
    model.generate(**generation_inputs(model, features(model, 200)), language="hi", task="transcribe", max_length=8)
    assert seen == [200]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generates_from_short_features(tiny_model_dir, num_beams):
    """Greedy and beam search decode from a window cut to the clip, as from the full window: token ids, one row per
    input row, within the vocabulary. The loop's `generate_ids` path (encoder output computed once) too."""
    model = allow_short_inputs(load_weights(str(tiny_model_dir)).eval())
    full = features(model, 500)
    cut = full[..., :window_frames([RATE + 1, RATE // 2], HOP, 1.0, RATE, 500)]
    assert cut.shape[-1] == 200
    settings = {"language": "hi", "task": "transcribe", "max_length": 8, "num_beams": num_beams}
    for inputs in (generation_inputs(model, cut), generation_inputs(model, full)):
        ids = model.generate(**inputs, **settings)
        assert ids.dtype == torch.long and ids.shape[0] == 2 and 0 < ids.shape[1] <= 8
        assert int(ids.max()) < model.config.vocab_size
    assert list(generation_inputs(model, full)) == ["input_features"]
    model.generation_config.language, model.generation_config.task = "hi", "transcribe"
    model.generation_config.max_length, model.generation_config.num_beams = 8, num_beams
    encoded = model.get_encoder()(cut)
    assert torch.equal(generate_ids(model, cut, encoded), model.generate(encoder_outputs=encoded, **settings))


@pytest.mark.parametrize(("lengths", "multiple_s", "expected"), [
    ([], 1.0, 100),                       # no clip: one multiple
    ([0, 0], 1.0, 100),                   # empty clips: one multiple
    ([16000], 1.0, 100),                  # exactly on a multiple: not one more
    ([16001, 300], 1.0, 200),             # one sample over: the next multiple
    ([16000 * 29 + 1], 1.0, 3000),        # rounds up to exactly the window
    ([16000 * 45], 1.0, 3000),            # longer than the window: the window
    ([8000], 0.5, 50),
    ([1], 0.015, 2),                      # 240 samples = 1.5 frames -> 2
    ([1], 0.025, 4),                      # 400 samples = 2.5 frames -> 3 -> even: 4
    ([2 * 1600 + 1], 0.1, 30),            # 0.1 s = 1600 samples, not 1600.0000000000002
])
def test_window_frames(lengths, multiple_s, expected):
    assert window_frames(lengths, HOP, multiple_s, RATE, 3000) == expected


def test_window_frames_takes_a_tensor_and_a_short_full_window():
    assert window_frames(torch.tensor([4000, 70000]), HOP, 1.0, RATE, 500) == 500
    assert window_frames(torch.tensor([4000, 30000]), HOP, 1.0, RATE, 500) == 200


@pytest.mark.parametrize("window", ["full", "dynamic"])
def test_load_model_applies_and_records_the_window(tiny_model_dir, tmp_path, window):
    """`load_model` swaps the encoder for `dynamic` and records it; `full` leaves a stock model, also when
    fine-tuning a checkpoint that was trained with a dynamic window. `load_for_inference` reads the record and
    `encoder_window` overrides it."""
    model, processor = load_model(ModelConfig(name_or_path=str(tiny_model_dir), encoder_window="dynamic",
                                              encoder_window_multiple_s=2.0))
    model.save_pretrained(tmp_path / "dynamic")
    processor.save_pretrained(tmp_path / "dynamic")
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "dynamic"), encoder_window=window))
    expected_class = ShortInputWhisperEncoder if window == "dynamic" else WhisperEncoder
    assert type(model.get_encoder()) is expected_class
    assert saved_encoder_window(model) == ((window, 1.0) if window == "dynamic" else ("full", 1.0))
    inference, _ = load_for_inference(str(tmp_path / "dynamic"))
    assert type(inference.get_encoder()) is ShortInputWhisperEncoder
    assert saved_encoder_window(inference) == ("dynamic", 2.0)
    inference, _ = load_for_inference(str(tmp_path / "dynamic"), encoder_window="full")
    assert type(inference.get_encoder()) is WhisperEncoder
    assert saved_encoder_window(inference) == ("full", 1.0)


def test_allow_short_inputs_refuses_another_model():
    with pytest.raises(TypeError, match="expected a Whisper model"):
        allow_short_inputs(torch.nn.Linear(2, 2))
