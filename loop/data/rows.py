"""One utterance inside a preparation batch (`loop.data.prepare`): a `Record` that `check_row` decodes and
tokenizes or marks skipped with its reason, `pack_groups` and `join_rows` join with its neighbours (with
`pack_to_seconds`), `add_timestamps` relabels with timestamp tokens, and `output_columns` writes as the prepared
columns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loop.data.audio import SAMPLE_RATE, AudioError, decode_audio, quantize
from loop.data.timestamp_labels import (
    TimestampSettings,
    TimestampTokens,
    quantize_down,
    quantize_up,
    segment_text_ids,
    speech_bounds,
    timestamp_label_ids,
    timestamp_label_length,
    wants_timestamps,
)

KEPT_COLUMNS = ("id", "audio_path", "text", "client_id")
NO_TIMESTAMPS = TimestampSettings()  # every row keeps <|notimestamps|>


@dataclass(frozen=True)
class RowChecks:
    """What a row must satisfy to be used; all of it decides what preparation writes (and the cache's name)."""

    max_duration_s: float
    """Longest audio, in seconds (never more than the model's window)."""
    max_label_length: int
    """Most label tokens, prefix and `<|endoftext|>` included (the decoder's `max_target_positions`)."""
    min_duration_s: float = 0.0
    """Less audio than this is implausible (`data.min_duration_s`)."""
    min_chars_per_second: float = 0.0
    """A slower transcript is implausible (`data.min_chars_per_second`)."""
    max_chars_per_second: float = math.inf
    """A faster transcript is implausible (`data.max_chars_per_second`)."""
    keep_implausible: bool = False
    """Evaluation: keep an implausible row, flagged in the `implausible` column, instead of skipping it."""

    def implausibility(self, text: str, duration: float) -> tuple[str, str] | None:
        """(reason, message) when `duration` seconds of audio cannot plausibly hold the transcript `text`; the rate
        counts the transcript's characters as written (spaces and punctuation included)."""
        if duration < self.min_duration_s:
            return ("implausible_duration",
                    f"{duration:.3g} s of audio is under the {self.min_duration_s:g} s minimum (data.min_duration_s)")
        rate = len(text) / duration
        if not self.min_chars_per_second <= rate <= self.max_chars_per_second:
            return ("implausible_rate",
                    f"{len(text)} characters in {duration:.3g} s of audio is {rate:.1f} per second, outside "
                    f"{self.min_chars_per_second:g}-{self.max_chars_per_second:g} (data.min_chars_per_second, "
                    "data.max_chars_per_second): is the transcript this clip's?")
        return None


@dataclass(eq=False)  # a row in flight, compared by identity: `pack_batch` finds a group by its first row
class Record:
    """One row of a map batch on its way to the prepared table: read from the batch, then decoded and tokenized
    by `check_row` (or given a skip reason), and possibly joined with its neighbours by `join_rows`."""

    text: str
    """The transcript, stripped (a packed row's: its utterances' joined by a space)."""
    origin: str
    """Where the row came from (`train.tsv row 12`), the start of every message about it."""
    source: str | bytes | None
    """Encoded audio bytes or a path; empty when the source gave none."""
    kept: dict[str, str]
    """The kept columns other than `text` (`id`, `audio_path`, `client_id`), as the source gave them."""
    waveform: np.ndarray | None = None
    """(num_samples,) float32 at 16 kHz, once decoded."""
    ids: list[int] = field(default_factory=list)
    """Label token ids of `text`; empty for a skipped row."""
    skip_reason: str = ""
    """Short key the row is counted under when it cannot be used (`too_long`, ...); empty for a usable row."""
    skip_message: str = ""
    """`<origin>: what is wrong`, for the split's report."""
    implausible: str = ""
    """`<origin>: what is implausible` for a row kept although implausible (evaluation); empty when plausible."""
    utterances: int = 1
    """How many utterances the row holds (more than 1 once packed)."""
    segments: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) seconds of each utterance's speech in the row's audio (`loop.data.timestamp_labels.speech_bounds`)."""
    segment_ids: list[list[int]] = field(default_factory=list)
    """Each utterance's text ids as a timestamped segment (only when rows may get timestamps)."""
    timestamped: bool = False
    """Whether `ids` carry timestamps instead of `<|notimestamps|>`."""

    @classmethod
    def from_batch(cls, batch: dict, index: int) -> Record:
        return cls(text=batch["text"][index].strip(), origin=batch["origin"][index],
                   source=batch["audio_bytes"][index] or batch["audio_path"][index],
                   kept={name: batch[name][index] for name in KEPT_COLUMNS if name != "text"})

    @property
    def duration(self) -> float:
        """Seconds of decoded audio (0 before decoding or when it failed)."""
        return 0.0 if self.waveform is None else len(self.waveform) / SAMPLE_RATE

    def skip(self, reason: str, message: str) -> None:
        self.skip_reason, self.skip_message = reason, f"{self.origin}: {message}"


def check_row(record: Record, tokenizer, checks: RowChecks, with_segment_ids: bool = False) -> None:
    """Decodes the row's audio and tokenizes its transcript, or gives it the first skip reason that applies: an
    audio error, an empty transcript, audio over `max_duration_s`, labels over `max_label_length`, then an
    implausible row (`RowChecks.implausibility`), which `keep_implausible` keeps and flags instead. A usable row
    gets its speech bounds, and with `with_segment_ids` its text's ids as a timestamped segment too."""
    try:
        if not record.source:
            raise AudioError("missing_clip", "no audio given")
        record.waveform = decode_audio(record.source)
    except AudioError as error:
        return record.skip(error.reason, str(error))
    if not record.text:
        return record.skip("empty_transcript", "transcript is empty")
    if record.duration > checks.max_duration_s:
        return record.skip("too_long", f"{record.duration:.1f} s of audio is over the {checks.max_duration_s:g} s limit")
    ids = tokenizer(record.text).input_ids
    if len(ids) > checks.max_label_length:
        return record.skip("labels_too_long", f"{len(ids)} label tokens, more than the model's {checks.max_label_length}")
    problem = checks.implausibility(record.text, record.duration)
    if problem and not checks.keep_implausible:
        return record.skip(*problem)
    record.ids = ids
    record.implausible = f"{record.origin}: {problem[1]}" if problem else ""
    record.segments = [speech_bounds(record.waveform)]
    record.segment_ids = [segment_text_ids(tokenizer, record.text)] if with_segment_ids else []


def pack_groups(records: list[Record], tokenizer, pack_to_seconds: float,
                max_label_length: int) -> list[tuple[list[Record], list[int]]]:
    """Greedy packing of consecutive usable `records` (distil-whisper's way of filling Whisper's 30-s window): a
    group grows while its audio stays within `pack_to_seconds` and its joined transcript within `max_label_length`
    tokens (when rows may get timestamps, `segment_ids` set: with timestamps too, so a group fits either way);
    a row that fits neither starts the next group. Every row lands in exactly one group, in order.

    Returns (members, label ids) per group: the ids of the joined transcript come from the tokenization that
    admitted the group's last member, so no group is tokenized again; a group of one keeps its row's ids."""
    groups: list[tuple[list[Record], list[int]]] = []
    seconds = 0.0
    for record in records:
        if groups and seconds + record.duration <= pack_to_seconds:
            members = groups[-1][0] + [record]
            ids = tokenizer(" ".join(member.text for member in members)).input_ids
            fits_timestamped = not record.segment_ids or timestamp_label_length(
                tokenizer, [t for member in members for t in member.segment_ids]) <= max_label_length
            if len(ids) <= max_label_length and fits_timestamped:
                groups[-1] = (members, ids)
                seconds += record.duration
                continue
        groups.append(([record], record.ids))
        seconds = record.duration
    return groups


def join_rows(members: list[Record], ids: list[int]) -> Record:
    """One packed row: the members' audio end to end, their transcripts joined by a space with `ids` as labels,
    and each kept column's values joined by " + ". A group of one is its row as it was."""
    if len(members) == 1:
        return members[0]
    offsets = np.cumsum([0.0] + [member.duration for member in members[:-1]])
    # Each utterance's speech bounds moved to its place in the row, kept on the timestamp grid outward.
    segments = [(quantize_down(offset + start), quantize_up(offset + end))
                for offset, member in zip(offsets, members) for start, end in member.segments]
    return Record(
        text=" ".join(member.text for member in members),
        origin=" + ".join(member.origin for member in members),
        source=None,
        kept={name: " + ".join(str(member.kept[name] or "") for member in members) for name in members[0].kept},
        waveform=np.concatenate([member.waveform for member in members]),
        ids=ids,
        implausible="; ".join(member.implausible for member in members if member.implausible),
        utterances=len(members),
        segments=segments,
        segment_ids=[text_ids for member in members for text_ids in member.segment_ids],
    )


def pack_batch(records: list[Record], tokenizer, pack_to_seconds: float, max_label_length: int) -> list[Record]:
    """The usable records packed (`pack_groups`), the skipped ones as they were, in input order: a packed row
    takes the place of its first utterance."""
    usable = [record for record in records if not record.skip_reason]
    packed = {members[0]: join_rows(members, ids)
              for members, ids in pack_groups(usable, tokenizer, pack_to_seconds, max_label_length)}
    return [packed.get(record, record) for record in records if record.skip_reason or record in packed]


def add_timestamps(records: list[Record], tokenizer, settings: TimestampSettings, max_label_length: int) -> None:
    """Gives the usable rows that `wants_timestamps` picks timestamped labels, one segment per utterance; a row
    whose labels would then pass `max_label_length` is skipped as `labels_too_long`, like any other (packed rows
    never are: `pack_groups` kept room for their timestamps)."""
    tokens = TimestampTokens(tokenizer)
    for record in records:
        if record.skip_reason or not wants_timestamps(record.origin, settings):
            continue
        ids = timestamp_label_ids(tokenizer, tokens, record.segments, record.segment_ids)
        if len(ids) > max_label_length:
            record.skip("labels_too_long", f"{len(ids)} label tokens with timestamps (data.timestamp_fraction), "
                                           f"more than the model's {max_label_length}")
            continue
        record.ids, record.timestamped = ids, True


def output_columns(records: list[Record]) -> dict:
    """The prepared columns of `records`: a skipped row gets no audio and no labels."""
    quantized = [quantize(record.waveform) if not record.skip_reason else (np.zeros(0, np.int16), 1.0)
                 for record in records]
    return {
        "audio": [samples for samples, _ in quantized],
        "audio_scale": [scale for _, scale in quantized],
        "labels": [record.ids for record in records],
        "duration": [record.duration for record in records],
        "utterances": [record.utterances for record in records],
        "segments": [[list(segment) for segment in record.segments] for record in records],
        "timestamped": [record.timestamped for record in records],
        "skip_reason": [record.skip_reason for record in records],
        "skip_message": [record.skip_message for record in records],
        "implausible": [record.implausible for record in records],
        **{name: [record.kept[name] for record in records] for name in KEPT_COLUMNS if name != "text"},
        "text": [record.text for record in records],
    }
