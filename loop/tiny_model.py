"""A tiny, randomly initialised Whisper and a locally trained tokenizer, for tests and the offline quickstart.

Nothing here reaches the Hub: the tokenizer is byte-level BPE trained on the corpus text and then given Whisper's
full special-token set in Whisper's order (`<|endoftext|>`, `<|startoftranscript|>`, the language tokens, the task
tokens, `<|notimestamps|>`, the timestamps), so the tokenizer's `prefix_tokens` arithmetic and `generate(language=...,
task=...)` behave exactly as with a Hub checkpoint. The result is an ordinary `save_pretrained` folder.
"""

from __future__ import annotations

import tempfile
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


def whisper_special_tokens() -> list[str]:
    """Whisper's special tokens in the order (and so the relative ids) of the real multilingual tokenizer."""
    languages = [f"<|{code}|>" for code in LANGUAGES]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    return ["<|endoftext|>", "<|startoftranscript|>", *languages, *TASK_TOKENS, *timestamps]


def train_tokenizer(sentences: list[str], vocab_size: int, language: str, task: str = "transcribe") -> WhisperTokenizer:
    """Byte-level BPE with `vocab_size` regular tokens, trained on `sentences`, plus Whisper's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(sentences, trainer)
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in whisper_special_tokens()])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        bpe.save(str(path))
        return WhisperTokenizer(
            tokenizer_file=str(path), pad_token="<|endoftext|>", language=language, task=task, predict_timestamps=False
        )


def whisper_generation_config(tokenizer: WhisperTokenizer, max_length: int) -> GenerationConfig:
    """What a Hub checkpoint's generation_config.json carries, so `generate(language=..., task=...)` works."""
    ids = tokenizer.convert_tokens_to_ids
    end = ids("<|endoftext|>")
    config = GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"),
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=max_length,
        suppress_tokens=[],
        begin_suppress_tokens=[ids("Ġ"), end],  # never start a transcript with a bare space or with the end
    )
    config.is_multilingual = True
    config.lang_to_id = {f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES}
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
) -> Path:
    """Writes model, generation config, feature extractor and tokenizer to `output_dir`; returns the folder.

    `chunk_length_s` sets the audio window: the feature extractor pads to chunk_length_s * 100 mel frames and the
    encoder takes half as many positions (its second convolution has stride 2), so a short window shrinks the
    encoder's work in proportion.
    """
    tokenizer = train_tokenizer(sentences, vocab_size, language)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length_s)
    ids = tokenizer.convert_tokens_to_ids
    end = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
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
    model.generation_config = whisper_generation_config(tokenizer, max_length=max_target_positions)
    output_dir = Path(output_dir)
    # float16 halves the file; the loop loads every model in float32 (loop.model), so training is unaffected.
    model.to(getattr(torch, storage_dtype)).save_pretrained(output_dir)
    WhisperProcessor(feature_extractor, tokenizer).save_pretrained(output_dir)
    return output_dir
