"""Decoding options that fight hallucination, all off by default: `eval.no_repeat_ngram_size`,
`eval.max_new_tokens_per_second` and `eval.temperature_fallback`.

They live in the model's generation config like language, task and beams, so a model folder saved by the loop
decodes with them in the loop, `scripts/evaluate.py` and the demo alike. `no_repeat_ngram_size` is transformers'
own generation setting; `max_new_tokens_per_second`, `temperature_fallback` and `fallback_compression_ratio` are
ours, saved in the same file: a hypothesis that runs longer than its audio could hold is stopped at end-of-text
instead of looping to `max_length` (`DurationCap`), and a hypothesis whose text compresses like a loop is decoded
again by sampling at rising temperatures (`temperature_fallback`).

The fallback is written here rather than taken from transformers' `generate(temperature=(...))`: there (5.24) a
short-form batch with a log-prob threshold fails inside `generate`, with `encoder_outputs` whatever the options,
and its compression ratio is computed on token ids with thresholds unlike Whisper's. Ours follows openai/whisper's
`transcribe`: the ratio of the text's UTF-8 bytes to their zlib compression, 2.4, the same ratio the hallucination
metrics report (`compression_ratio` below, which `loop.eval.hallucination` imports), and the last temperature's result is kept if none passes.
"""

from __future__ import annotations

import math
import zlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList

COMPRESSION_RATIO_THRESHOLD = 2.4  # Whisper's and faster-whisper's default for temperature fallback


def compression_ratio(text: str) -> float:
    """UTF-8 bytes of `text` over its zlib-compressed bytes (Whisper's definition); 0.0 for empty text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# Whisper's own fallback temperatures after greedy decoding (openai/whisper `transcribe`, faster-whisper).
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
FALLBACK_SEED = 0  # sampling draws from its own generator state, so evaluations repeat and training's RNG is untouched
MIN_NEW_TOKENS = 8  # the duration cap never stops a hypothesis shorter than this (a one-word clip, a name)


def apply_decoding_options(settings, eval_config) -> None:
    """Writes the `eval.*` decoding options into a model's generation config (`settings`), clearing the ones that
    are off so that a folder saved without them decodes without them."""
    settings.no_repeat_ngram_size = eval_config.no_repeat_ngram_size or None
    settings.max_new_tokens_per_second = eval_config.max_new_tokens_per_second or None
    settings.temperature_fallback = eval_config.temperature_fallback
    settings.fallback_compression_ratio = (eval_config.compression_ratio_threshold
                                           if eval_config.temperature_fallback else None)


OPTION_NAMES = ("no_repeat_ngram_size", "max_new_tokens_per_second", "temperature_fallback",
                "compression_ratio_threshold")  # the `eval.*` options this module writes into a generation config


def override_decoding_options(settings, values: dict) -> None:
    """Changes some options of a loaded model's generation config (`values`: `eval.*` names -> typed values, as
    typed on `scripts/evaluate.py`'s command line); the others stay as the model folder saved them."""
    from loop.config import EvalConfig

    saved = describe(settings)
    current = EvalConfig(no_repeat_ngram_size=saved["no_repeat_ngram_size"] or 0,
                         max_new_tokens_per_second=saved["max_new_tokens_per_second"] or 0.0,
                         temperature_fallback=saved["temperature_fallback"],
                         compression_ratio_threshold=saved["compression_ratio_threshold"] or COMPRESSION_RATIO_THRESHOLD)
    for name, value in values.items():
        setattr(current, name, value)
    apply_decoding_options(settings, current)


def describe(settings) -> dict:
    """The options as metrics.json and the report show them (None: off)."""
    return {"no_repeat_ngram_size": getattr(settings, "no_repeat_ngram_size", None) or None,
            "max_new_tokens_per_second": getattr(settings, "max_new_tokens_per_second", None) or None,
            "temperature_fallback": bool(getattr(settings, "temperature_fallback", False)),
            "compression_ratio_threshold": getattr(settings, "fallback_compression_ratio", None)}


class DurationCap(LogitsProcessor):
    """Forces end-of-text once a row has generated its share of tokens: `ceil(seconds * tokens_per_second)`, at
    least `MIN_NEW_TOKENS`. The prompt (start, language, task tokens) is the length of the first call's input.

    Rows are matched to their caps by position; with beams, generate repeats each row `num_beams` times in a row.
    Temperature fallback decodes again only the rows that failed, in fewer rows than the caps: those use the
    largest cap of the batch, which is still a cap on the audio at hand."""

    def __init__(self, seconds: torch.Tensor, tokens_per_second: float, end_token_id: int):
        self.caps = torch.clamp(torch.ceil(seconds.float() * tokens_per_second), min=MIN_NEW_TOKENS).long()
        self.end_token_id = end_token_id
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        rows, caps = input_ids.shape[0], self.caps.to(input_ids.device)
        if rows % len(caps) == 0:
            caps = caps.repeat_interleave(rows // len(caps))
        else:
            caps = caps.max().expand(rows)
        over = (input_ids.shape[1] - self.prompt_length) >= caps
        if over.any():
            forced = torch.full_like(scores[over], -math.inf)
            forced[:, self.end_token_id] = 0.0
            scores[over] = forced
        return scores


def generation_options(settings, seconds: torch.Tensor | None) -> dict:
    """Keyword arguments for `generate` beyond what the generation config holds: the duration cap as a logits
    processor, when it is on and the rows' durations are known."""
    options = {}
    tokens_per_second = getattr(settings, "max_new_tokens_per_second", None)
    if tokens_per_second and seconds is not None:
        end = settings.eos_token_id[0] if isinstance(settings.eos_token_id, (list, tuple)) else settings.eos_token_id
        options["logits_processor"] = LogitsProcessorList([DurationCap(seconds, tokens_per_second, end)])
    return options


def needs_fallback(texts: list[str], settings) -> list[int]:
    """Rows whose text compresses beyond the threshold (none when the fallback is off)."""
    if not getattr(settings, "temperature_fallback", False):
        return []
    threshold = settings.fallback_compression_ratio or COMPRESSION_RATIO_THRESHOLD
    return [row for row, text in enumerate(texts) if compression_ratio(text) > threshold]


@torch.no_grad()
def temperature_fallback(token_ids: torch.Tensor, decode_texts, sample, settings, any_process=bool) -> torch.Tensor:
    """`token_ids` (batch, length) with each row whose text loops (`needs_fallback`) decoded again by `sample(rows,
    temperature)` -> ids of those rows, at each of `FALLBACK_TEMPERATURES` in turn until it passes; a row that never
    passes keeps its last sample. `decode_texts(ids)` turns ids into texts.

    `any_process(flag)`: whether `flag` holds on any process, when `sample` is a collective (ZeRO-3's
    `generate(synced_gpus=True)` steps with the others): then every process samples as long as one still has a
    looping row, a process with none left sampling its row 0 and dropping the result."""
    rows = needs_fallback(decode_texts(token_ids), settings)
    if not any_process(bool(rows)):
        return token_ids
    devices = [token_ids.device] if token_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(FALLBACK_SEED)
        for temperature in FALLBACK_TEMPERATURES:
            sampled = sample(torch.tensor(rows or [0], device=token_ids.device), temperature)
            if rows:
                token_ids = _put_rows(token_ids, rows, sampled, settings.pad_token_id)
                still = set(needs_fallback(decode_texts(sampled), settings))
                rows = [row for position, row in enumerate(rows) if position in still]
            if not any_process(bool(rows)):
                break
    return token_ids


def _put_rows(token_ids: torch.Tensor, rows: list[int], new: torch.Tensor, pad_id: int) -> torch.Tensor:
    """`token_ids` with `rows` replaced by `new`'s rows, both padded with `pad_id` to the longer length."""
    width = max(token_ids.shape[1], new.shape[1])
    pad = lambda ids: torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad_id)  # noqa: E731
    token_ids, new = pad(token_ids).clone(), pad(new)
    token_ids[torch.tensor(rows, device=token_ids.device)] = new
    return token_ids
