"""Timestamp labels for training rows: where the speech of a clip lies, which rows get timestamps, and their tokens.

Whisper predicts segment times as tokens `<|0.00|>` ... `<|30.00|>` (steps of 0.02 s) when its prompt lacks
`<|notimestamps|>`. A model fine-tuned only on `<|notimestamps|>` labels loses that skill (transformers#30148);
distil-whisper keeps it by training a share of rows with timestamps. `data.timestamp_fraction` does the same here:
that share of training rows gets `<|sot|><|lang|><|task|><|start|> text<|end|><|endoftext|>`, one segment per
utterance (a packed row's utterances at their offsets in the row).

The bounds of each segment are the clip's speech bounds by energy (`speech_bounds`), so the silence a recorder
leaves before and after a sentence is not counted as speech. Which rows get timestamps is a hash of (seed, row
origin) (`wants_timestamps`), not a draw from the global RNG: the choice is part of the prepared cache and its
fingerprint, the same in every process and after a resume.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from loop.data.audio import SAMPLE_RATE

RESOLUTION_S = 0.02  # seconds per timestamp token: <|0.00|>, <|0.02|>, ... (Whisper's 1501 timestamps span 30 s)
FRAME_SAMPLES = round(RESOLUTION_S * SAMPLE_RATE)  # 320 samples: one energy frame per timestamp step
SPEECH_BELOW_PEAK_DB = 35.0  # a frame is speech when its energy is within this many dB of the loudest frame
GRID_TOLERANCE = 1e-3  # of a step: 20 us
SILENCE_DBFS = -70.0  # a clip whose loudest frame is quieter than this has no speech to find: its bounds are the clip


@dataclass(frozen=True)
class TimestampSettings:
    """Which training rows get timestamp labels (`data.timestamp_fraction`, seeded by `train.seed`); part of the
    prepared cache's fingerprint."""

    fraction: float = 0.0
    """Share of rows with timestamps (0: none, every row keeps `<|notimestamps|>`)."""
    seed: int = 0
    """Seeds the choice of rows (`wants_timestamps`)."""


def speech_bounds(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[float, float]:
    """(start, end) in seconds of the speech in a clip, on the 0.02-s grid of Whisper's timestamp tokens.

    The rule: cut the clip into frames of 0.02 s (one timestamp step), take each frame's mean power in dB; the
    speech runs from the first to the last frame within `SPEECH_BELOW_PEAK_DB` of the loudest frame, so the start
    is rounded down and the end up to the grid (no speech is cut off). Relative to the clip's own peak, the rule
    does not depend on its level; the 35 dB leave room for soft onsets (fricatives lie 20-30 dB below vowels) while
    a recorder's hiss (40-60 dB below speech) stays out. A clip with nothing louder than `SILENCE_DBFS` has no
    speech to find: its bounds are the whole clip. The end never passes the clip's end.
    """
    duration = len(waveform) / sample_rate
    frame = max(1, round(RESOLUTION_S * sample_rate))
    count = len(waveform) // frame + (len(waveform) % frame > 0)
    if count == 0:
        return 0.0, 0.0
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: len(waveform)] = waveform
    power_db = 10 * np.log10(np.mean(padded.reshape(count, frame) ** 2, axis=1) + 1e-20)
    if power_db.max() < SILENCE_DBFS:
        return 0.0, quantize_up(duration)
    speech = np.flatnonzero(power_db >= power_db.max() - SPEECH_BELOW_PEAK_DB)
    start = speech[0] * RESOLUTION_S
    end = min((speech[-1] + 1) * RESOLUTION_S, quantize_up(duration))
    return round(start, 2), round(end, 2)


def quantize_up(seconds: float) -> float:
    """`seconds` rounded up to the timestamp grid; within 20 us of a grid point counts as on it (float32 durations
    and bounds, as the cache stores them, are off by about 0.1 us)."""
    return round(math.ceil(seconds / RESOLUTION_S - GRID_TOLERANCE) * RESOLUTION_S, 2)


def quantize_down(seconds: float) -> float:
    """`seconds` rounded down to the timestamp grid, with `quantize_up`'s tolerance."""
    return round(math.floor(seconds / RESOLUTION_S + GRID_TOLERANCE) * RESOLUTION_S, 2)


def wants_timestamps(origin: str, settings: TimestampSettings) -> bool:
    """Whether the row from `origin` (`train.tsv row 12`, a packed row's origins joined) gets timestamp labels:
    a uniform number from the SHA-256 of (seed, origin), below the fraction. Deterministic and independent of
    batching, worker processes and the global RNG."""
    if settings.fraction <= 0:
        return False
    digest = hashlib.sha256(f"{settings.seed}\0{origin}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < settings.fraction


class TimestampTokens:
    """The timestamp token ids of one tokenizer: `<|0.00|>` ... `<|30.00|>`, consecutive.

    Taken from the tokenizer where it knows them as tokens; some tokenizer files leave them out (the model still
    predicts them), and then from Whisper's layout, the one transformers' own timestamp decoding relies on: they
    follow `<|notimestamps|>`. Never hard-coded: large-v3's ids are one higher than the earlier models'."""

    COUNT = 1501  # <|0.00|> ... <|30.00|>

    def __init__(self, tokenizer):
        no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
        unknown = {tokenizer.unk_token_id, None}
        if no_timestamps in unknown:
            raise ValueError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no <|notimestamps|> "
                             "token: it is not a Whisper tokenizer, and its model cannot be trained with timestamps")
        self.no_timestamps = no_timestamps
        first = tokenizer.convert_tokens_to_ids("<|0.00|>")
        self.begin = first if first not in unknown and first != tokenizer.eos_token_id else no_timestamps + 1
        self.last = self.begin + self.COUNT - 1

    def token(self, seconds: float) -> int:
        """The id of the timestamp at `seconds` (rounded to the grid); ValueError past 30 s."""
        step = round(seconds / RESOLUTION_S)
        if not 0 <= step < self.COUNT:
            raise ValueError(f"{seconds:g} s is outside Whisper's timestamps (0 to 30 s)")
        return self.begin + step

    def is_timestamp(self, token_id: int) -> bool:
        return self.begin <= token_id <= self.last

    def seconds(self, token_id: int) -> float:
        return round((token_id - self.begin) * RESOLUTION_S, 2)


def segment_text_ids(tokenizer, text: str) -> list[int]:
    """The tokens of one segment's text: with a leading space, as Whisper writes every timestamped segment
    (`<|0.00|> Hello<|1.20|><|1.20|> world<|2.00|>`), so that segments decode to words separated by spaces."""
    return tokenizer(" " + text, add_special_tokens=False).input_ids


def timestamp_label_ids(tokenizer, tokens: TimestampTokens, segments: list[tuple[float, float]],
                        texts: list[list[int]]) -> list[int]:
    """Labels with timestamps: the tokenizer's prefix without `<|notimestamps|>`, then per segment its start, its
    text ids (`segment_text_ids`) and its end, then `<|endoftext|>`."""
    prefix = [token for token in tokenizer.prefix_tokens if token != tokens.no_timestamps]
    ids = list(prefix)
    for (start, end), text in zip(segments, texts, strict=True):
        ids += [tokens.token(start), *text, tokens.token(end)]
    return ids + [tokenizer.eos_token_id]


def timestamp_label_length(tokenizer, texts: list[list[int]]) -> int:
    """How many tokens `timestamp_label_ids` gives for segments with these text ids."""
    return len(tokenizer.prefix_tokens) - 1 + sum(len(text) + 2 for text in texts) + 1
