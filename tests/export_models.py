"""A small Whisper that faster-whisper runs as it runs a real multilingual checkpoint, for the export tests.

assets/tiny-whisper-hi cannot stand in for it, for two reasons that are faster-whisper's and CTranslate2's, not
the model's:
- faster-whisper 1.2 pads every window of features to 3000 frames (`pad_or_trim(segment)`), whatever the
  model's window: a model needs Whisper's 30-s window (1500 encoder positions), not the tiny model's 5 s;
- faster-whisper decodes up to 448 tokens, so the decoder needs Whisper's 448 positions;
- CTranslate2 4.8 takes a Whisper model for multilingual only when its vocabulary holds the empty-string token
  that the real multilingual vocabulary has (id 50256, before `<|endoftext|>`); otherwise faster-whisper decodes
  as English-only, without language and task tokens.

So the BPE tokenizer of `loop.model.tiny` gets that empty token before its special tokens and unused special
tokens after them, up to the real vocabulary's 51,865 tokens, and the model has a 30-s window. Every special
token but `<|endoftext|>`, and every filler, is suppressed in generation (random weights would emit them and
decode to nothing), and the weight matrices are scaled up as in `tests.helpers.build_decoding_checkpoint`, so
that every clip gets a different transcript.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from loop.config import EvalConfig
from loop.model.loading import set_generation_settings
from loop.model.tiny import train_tokenizer, whisper_generation_config
from tests.helpers import DECODE_MAX_LENGTH, WEIGHT_SCALE, corpus_rows, load_script, reset_accelerate

MULTILINGUAL_VOCAB_SIZE = 51865  # whisper-tiny ... large-v2; large-v3 has 51866
EMPTY_TOKEN = ""  # the real multilingual vocabulary's token 50256, which CTranslate2 looks for
WHISPER_EMPTY_ID = 50256
WINDOW_S = 30


def multilingual_tokenizer(folder: Path, bpe_size: int = 600, whisper_ids: bool = False) -> WhisperTokenizer:
    """`loop.model.tiny`'s tokenizer laid out as a multilingual Whisper's: BPE tokens, the empty token, the special
    tokens, then fillers to 51,865 tokens; saved in `folder` and loaded back. With `whisper_ids` the fillers go
    before the empty token instead (plain tokens no merge produces), so that every special token has the id it has
    in the real vocabulary (<|endoftext|> 50257): whisper.cpp does not read special ids from the file, it assumes
    them."""
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    train_tokenizer(sentences, bpe_size, "hindi").save_pretrained(folder)
    path = folder / "tokenizer.json"
    layout = json.loads(path.read_text(encoding="utf-8"))
    vocab = layout["model"]["vocab"]
    if whisper_ids:
        for number in range(len(vocab), WHISPER_EMPTY_ID):
            vocab[f"fill{number}"] = number
    empty_id = len(vocab)
    vocab[EMPTY_TOKEN] = empty_id
    shift = empty_id + 1 - min(token["id"] for token in layout["added_tokens"])
    for token in layout["added_tokens"]:  # the special tokens follow the empty token, as in the real vocabulary
        token["id"] += shift
    next_id = max(token["id"] for token in layout["added_tokens"]) + 1
    filler = dict(layout["added_tokens"][-1])
    for number, token_id in enumerate(range(next_id, MULTILINGUAL_VOCAB_SIZE)):
        layout["added_tokens"].append({**filler, "id": token_id, "content": f"<|unused{number}|>"})
    path.write_text(json.dumps(layout, ensure_ascii=False), encoding="utf-8")
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    assert len(tokenizer) == MULTILINGUAL_VOCAB_SIZE and tokenizer.convert_tokens_to_ids(EMPTY_TOKEN) == empty_id
    return tokenizer


def bpe_count(tokenizer) -> int:
    """Tokens before the first filler of a `whisper_ids` tokenizer (all of them without fillers)."""
    vocab = tokenizer.get_vocab()
    return min((index for token, index in vocab.items() if token.startswith("fill")), default=len(vocab))


def build_multilingual_tiny_whisper(folder: str | Path, *, num_mel_bins: int = 80, d_model: int = 64,
                                    layers: int = 2, heads: int = 2, seed: int = 0, whisper_ids: bool = False) -> Path:
    """Writes a random 30-s-window Whisper with `num_mel_bins` mel bins (80; 128 as large-v3) and a multilingual
    vocabulary to `folder` (with `whisper_ids`, its special tokens at the real vocabulary's ids, as whisper.cpp
    needs), saved the way the loop saves best/; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = multilingual_tokenizer(folder, whisper_ids=whisper_ids)
    ids = tokenizer.convert_tokens_to_ids
    end = ids("<|endoftext|>")
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=WINDOW_S)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        max_source_positions=feature_extractor.nb_max_frames // 2, max_target_positions=448,
        decoder_start_token_id=ids("<|startoftranscript|>"), pad_token_id=end, bos_token_id=end, eos_token_id=end,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "layer_norm" not in name and "embed_positions" not in name:
                parameter.mul_(WEIGHT_SCALE)
    if whisper_ids:  # the fillers' output logits are 0, below the best real token's: no runtime picks them
        with torch.no_grad():
            model.model.decoder.embed_tokens.weight[bpe_count(tokenizer):WHISPER_EMPTY_ID] = 0
    model.generation_config = whisper_generation_config(tokenizer, max_length=DECODE_MAX_LENGTH)
    set_generation_settings(model, "hindi", "transcribe", EvalConfig(generation_max_length=DECODE_MAX_LENGTH))
    not_text = set(range(ids("<|endoftext|>") - 1, len(tokenizer)))  # the empty token and everything after it
    model.generation_config.suppress_tokens = sorted(not_text - {end})
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor, tokenizer).save_pretrained(folder)
    return folder


def run_export(*argv) -> int:
    """scripts/export.py's main() in-process on `argv` (paths and numbers as they are); its exit status."""
    try:
        return load_script("export").main([str(a) for a in argv])
    finally:
        reset_accelerate()
