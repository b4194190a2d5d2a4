"""A tiny, randomly initialised Whisper and a locally trained tokenizer, for tests and the offline quickstart.

Nothing here reaches the Hub: the tokenizer is byte-level BPE trained on the corpus text and then given Whisper's
full special-token set in Whisper's order (`<|endoftext|>`, `<|startoftranscript|>`, the language tokens, the task
tokens, `<|notimestamps|>`, the timestamps), so the tokenizer's `prefix_tokens` arithmetic and `generate(language=...,
task=...)` behave exactly as with a Hub checkpoint. The result is an ordinary `save_pretrained` folder.

Two shapes, as the Hub's multilingual checkpoints come (`SHAPES`):
- `v2` (tiny ... large-v2, medium, small): 80 mel bins and 99 language tokens, so with a GPT-2 vocabulary of 50,257
  <|translate|> is 50358, <|transcribe|> 50359, <|notimestamps|> 50363 and <|0.00|> 50364;
- `v3` (large-v3, large-v3-turbo): 128 mel bins and a 100th language token, <|yue|> (50358), after <|su|>, which
  moves every later id up by one: <|translate|> 50359, <|transcribe|> 50360, <|notimestamps|> 50364, <|0.00|> 50365.
transformers' `LANGUAGES` lists all 100 (yue last), so a v2 tokenizer is that list without yue.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

NUM_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in steps of 0.02 s
TASK_TOKENS = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
# The special tokens every multilingual Hub checkpoint's generation config suppresses (besides some punctuation of
# its GPT-2 vocabulary, which this tokenizer does not share): v3's list ends 50258, 50359, ..., 50363, v2's 50258,
# 50358, ..., 50362: the same tokens, at each layout's ids.
SUPPRESSED_SPECIAL_TOKENS = ["<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                             "<|startofprev|>", "<|nospeech|>"]


@dataclass(frozen=True)
class WhisperShape:
    """What differs between the Hub's multilingual Whisper generations, as far as the data path sees it."""

    num_mel_bins: int
    """Mel bins of the features (the feature extractor's `feature_size`, the encoder's first convolution)."""
    languages: tuple[str, ...]
    """Language codes of the language tokens, in token order."""


SHAPES = {
    "v2": WhisperShape(num_mel_bins=80, languages=tuple(code for code in LANGUAGES if code != "yue")),
    "v3": WhisperShape(num_mel_bins=128, languages=tuple(LANGUAGES)),
}


def whisper_special_tokens(shape: str = "v2") -> list[str]:
    """Whisper's special tokens in the order (and so the relative ids) of the real multilingual tokenizer of
    `shape` (`SHAPES`)."""
    languages = [f"<|{code}|>" for code in SHAPES[shape].languages]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    return ["<|endoftext|>", "<|startoftranscript|>", *languages, *TASK_TOKENS, *timestamps]


def train_tokenizer(sentences: list[str], vocab_size: int, language: str, task: str = "transcribe",
                    shape: str = "v2") -> WhisperTokenizer:
    """Byte-level BPE with `vocab_size` regular tokens, trained on `sentences`, plus the special tokens of `shape`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(sentences, trainer)
    special = whisper_special_tokens(shape)
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        bpe.save(str(path))
        return WhisperTokenizer(
            tokenizer_file=str(path), pad_token="<|endoftext|>", language=language, task=task, predict_timestamps=False
        )


def whisper_generation_config(tokenizer: WhisperTokenizer, max_length: int, shape: str = "v2") -> GenerationConfig:
    """What a Hub checkpoint's generation_config.json of `shape` carries, so `generate(language=..., task=...)`
    works: every id is looked up in `tokenizer`, none is assumed."""
    ids = tokenizer.convert_tokens_to_ids
    end = ids("<|endoftext|>")
    config = GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"),
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=max_length,
        suppress_tokens=[ids(token) for token in SUPPRESSED_SPECIAL_TOKENS],
        begin_suppress_tokens=[ids("Ġ"), end],  # never start a transcript with a bare space or with the end
    )
    config.is_multilingual = True
    config.lang_to_id = {f"<|{code}|>": ids(f"<|{code}|>") for code in SHAPES[shape].languages}
    config.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    config.no_timestamps_token_id = ids("<|notimestamps|>")
    config.prev_sot_token_id = ids("<|startofprev|>")
    config.max_initial_timestamp_index = 50
    return config


def build_tiny_whisper(
    sentences: list[str],
    output_dir: str | Path,
    *,
    language: str = "hindi",
    vocab_size: int = 1000,
    chunk_length_s: int = 10,
    d_model: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_target_positions: int = 256,
    seed: int = 0,
    storage_dtype: str = "float32",
    shape: str = "v2",
) -> Path:
    """Writes model, generation config, feature extractor and tokenizer to `output_dir`; returns the folder.

    `chunk_length_s` sets the audio window: the feature extractor pads to chunk_length_s * 100 mel frames and the
    encoder takes half as many positions (its second convolution has stride 2), so a short window shrinks the
    encoder's work in proportion. `shape` (`SHAPES`) chooses v2's or v3's mel bins and special-token layout.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown Whisper shape {shape!r}: choose one of {', '.join(SHAPES)}")
    tokenizer = train_tokenizer(sentences, vocab_size, language, shape=shape)
    feature_extractor = WhisperFeatureExtractor(feature_size=SHAPES[shape].num_mel_bins, chunk_length=chunk_length_s)
    ids = tokenizer.convert_tokens_to_ids
    end = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=SHAPES[shape].num_mel_bins,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=feature_extractor.nb_max_frames // 2,
        max_target_positions=max_target_positions,
        decoder_start_token_id=ids("<|startoftranscript|>"),
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = whisper_generation_config(tokenizer, max_length=max_target_positions, shape=shape)
    output_dir = Path(output_dir)
    # float16 halves the file; the loop loads every model in float32 (loop.model.loading), so training is unaffected.
    model.to(getattr(torch, storage_dtype)).save_pretrained(output_dir)
    WhisperProcessor(feature_extractor, tokenizer).save_pretrained(output_dir)
    return output_dir
