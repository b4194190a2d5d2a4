"""Utterances -> model-ready rows: 16-kHz audio, Whisper `labels`, duration; cached by `datasets`.

Preparation runs as a batched `datasets.map` (with `num_proc` workers) into an Arrow cache file whose name is a
fingerprint of the inputs (rows, clip sizes and times) and of the settings (feature extractor, tokenizer, limits):
a second run with the same inputs reuses the file instead of decoding the audio again, once its preparation has
finished (`loop.cache_files`). Rows that cannot be used are kept through the map with a `skip_reason`, then counted
and dropped, so one bad clip never ends a preparation.
Implausible rows (too little audio, or a transcript too fast or too slow for it: a truncated clip, a mismatched
transcript) are skipped the same way in training splits; evaluation keeps them, flagged in an `implausible` column,
so its WER stays comparable with published figures on the same split.

Inside a map batch each row is one `Record`: `check_row` decodes and tokenizes it or says why it is skipped,
`pack_groups` and `join_rows` join consecutive usable rows (with `pack_to_seconds`), and `output_columns` writes the
columns. The cache holds the decoded, resampled audio as int16 with a per-row scale (`loop.audio.quantize`), not
features: the loop computes log-mel features per batch on the accelerator (`loop.features.LogMel`), so the cache
costs 32 kB per second of audio, whatever the model's window and mel bins, and one cache serves every model with
the same tokenizer and window.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np

from loop.audio import SAMPLE_RATE, AudioError, decode_audio, quantize
from loop.cache_files import discard_unfinished, is_complete, mark_complete
from loop.sources import MAX_MESSAGES_PER_REASON, SkipLog, strict_error
from loop.timestamps import (
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

PREP_VERSION = 6  # bump when _prepare_batch changes what it writes, so old caches are not reused
KEPT_COLUMNS = ("id", "audio_path", "text", "client_id")
DEFAULT_CACHE_DIR = Path("~/.cache/whisper-loop").expanduser()
PREPARED_FEATURES = datasets.Features(  # what `prepare` writes; `loop.no_speech` writes the same columns
    {
        "audio": datasets.List(datasets.Value("int16")),
        "audio_scale": datasets.Value("float32"),
        "labels": datasets.List(datasets.Value("int32")),
        "duration": datasets.Value("float32"),
        "utterances": datasets.Value("int32"),
        "segments": datasets.List(datasets.List(datasets.Value("float32"))),
        "timestamped": datasets.Value("bool"),
        "skip_reason": datasets.Value("string"),
        "skip_message": datasets.Value("string"),
        "implausible": datasets.Value("string"),
        **{name: datasets.Value("string") for name in KEPT_COLUMNS},
    }
)
NO_TIMESTAMPS = TimestampSettings()  # every row keeps <|notimestamps|>


@dataclass
class SplitReport:
    """What happened to one split's rows: how many were read and kept, why the others were skipped, and which kept
    rows are flagged as implausible."""

    name: str
    read: int = 0
    kept: int = 0
    skips: SkipLog = field(default_factory=SkipLog)
    windows: int = 0
    """Rows the kept utterances were packed into (0: not packed, one row per utterance)."""
    implausible: int = 0
    """Kept rows flagged as implausible (evaluation splits only: training splits skip such rows)."""
    implausible_messages: list[str] = field(default_factory=list)
    """The first of their flags, each naming the file and row (at most MAX_MESSAGES_PER_REASON)."""
    cache_bytes: int = 0
    """Size of the prepared cache files on disk."""
    audio_seconds: float = 0.0
    """Seconds of audio in the kept rows."""
    no_speech: int = 0
    """Rows of silence or noise with an empty transcript added to the kept ones (`data.no_speech_fraction`)."""
    timestamped: int = 0
    """Kept rows whose labels carry timestamps (`data.timestamp_fraction`; training splits only)."""

    def as_dict(self) -> dict:
        flagged = {"implausible": self.implausible, "implausible_messages": self.implausible_messages}
        rows = max(1, self.windows or self.kept)
        cache = {"cache_bytes": self.cache_bytes, "cache_bytes_per_row": round(self.cache_bytes / rows),
                 "cache_mb_per_audio_hour": round(self.cache_bytes / 1e6 / max(self.audio_seconds / 3600, 1e-9), 1)}
        return {"read": self.read, "kept": self.kept, **({"windows": self.windows} if self.windows else {}),
                **({"no_speech": self.no_speech} if self.no_speech else {}),
                **({"timestamped": self.timestamped} if self.timestamped else {}),
                **self.skips.as_dict(), **(flagged if self.implausible else {}),
                **(cache if self.cache_bytes and self.audio_seconds else {})}

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skips.counts.items())) or "none"
        examples = [f"\n    {message}" for messages in self.skips.messages.values() for message in messages[:3]]
        examples += [f"\n    flagged: {message}" for message in self.implausible_messages[:3]]
        packed = f" (packed into {self.windows} windows)" if self.windows else ""
        flagged = f"; flagged as implausible (kept): {self.implausible}" if self.implausible else ""
        flagged += f"; plus {self.no_speech} no-speech rows" if self.no_speech else ""
        return (f"{self.name}: {self.kept} of {self.read} utterances kept{packed}; skipped: {skipped}{flagged}"
                + "".join(examples))


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
    """(start, end) seconds of each utterance's speech in the row's audio (`loop.timestamps.speech_bounds`)."""
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


def _prepare_batch(batch, tokenizer, checks: RowChecks, strict: bool,
                   pack_to_seconds: float = 0.0, timestamps: TimestampSettings = NO_TIMESTAMPS) -> dict:
    """Batched map function: one pass over a map batch; bad rows get a `skip_reason` and no audio. With
    `pack_to_seconds` the usable rows come back packed (fewer rows), each bad row as it was; with a timestamp
    fraction, that share of the (packed) rows gets timestamped labels."""
    records = [Record.from_batch(batch, i) for i in range(len(batch["text"]))]
    for record in records:
        check_row(record, tokenizer, checks, with_segment_ids=timestamps.fraction > 0)
    first_bad = next((record for record in records if record.skip_reason), None)
    if strict and first_bad is not None:
        raise strict_error(first_bad.skip_reason, first_bad.skip_message)
    if pack_to_seconds:
        records = pack_batch(records, tokenizer, pack_to_seconds, checks.max_label_length)
    if timestamps.fraction > 0:
        add_timestamps(records, tokenizer, timestamps, checks.max_label_length)
        first_bad = next((record for record in records if record.skip_reason), None)
        if strict and first_bad is not None:
            raise strict_error(first_bad.skip_reason, first_bad.skip_message)
    return output_columns(records)


def prepare(
    utterances: datasets.Dataset,
    feature_extractor,
    tokenizer,
    report: SplitReport,
    *,
    max_duration_s: float,
    max_label_length: int,
    num_proc: int = 1,
    cache_dir: str | Path = "",
    pack_to_seconds: float = 0.0,
    min_duration_s: float = 0.0,
    min_chars_per_second: float = 0.0,
    max_chars_per_second: float = math.inf,
    keep_implausible: bool = False,
    timestamps: TimestampSettings = NO_TIMESTAMPS,
) -> datasets.Dataset:
    """Decodes, resamples and tokenizes `utterances`; returns only the usable rows.

    Columns of the result: `audio` (num_samples,) int16 and `audio_scale` (its samples times the scale are the
    16-kHz waveform, `loop.audio.dequantize`), `labels` (token ids, with Whisper's
    prefix `<|startoftranscript|><|lang|><|task|><|notimestamps|>` and `<|endoftext|>`), `duration` (seconds),
    `utterances` (how many utterances the row holds), `implausible` (empty, or why the row is implausible: only
    with `keep_implausible`, else such rows are skipped), and `id`, `audio_path`, `text`, `client_id` for reports.

    With `pack_to_seconds`, consecutive usable utterances are joined into one row while their audio fits that many
    seconds and their joined transcript fits `max_label_length` tokens (see `pack_groups`); a packed row's `id`,
    `audio_path` and `client_id` are its utterances' values joined by " + ".

    Every row has `segments`, the (start, end) seconds of each utterance's speech in its audio. With
    `timestamps.fraction` that share of the rows (chosen by `loop.timestamps.wants_timestamps`) is `timestamped`:
    its labels are `<|startoftranscript|><|lang|><|task|>`, then `<|start|> text<|end|>` per utterance, then
    `<|endoftext|>`.
    """
    checks = RowChecks(max_duration_s=min(max_duration_s, feature_extractor.chunk_length),
                       max_label_length=max_label_length, min_duration_s=min_duration_s,
                       min_chars_per_second=min_chars_per_second, max_chars_per_second=max_chars_per_second,
                       keep_implausible=keep_implausible)
    pack_to_seconds = min(pack_to_seconds, feature_extractor.chunk_length)
    if timestamps.fraction > 0:
        TimestampTokens(tokenizer)  # a tokenizer without them fails here, before any audio is decoded
    fingerprint = _fingerprint(utterances, feature_extractor, tokenizer, checks, pack_to_seconds, timestamps)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = PREPARED_FEATURES
    if len(utterances) == 0:  # `map` hands an empty table back unchanged, without the prepared columns
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    stem = f"{report.name}-{fingerprint}"
    discard_unfinished(cache_dir, stem)  # a killed preparation's files are prepared again, never reused
    prepared = utterances.map(
        _prepare_batch,
        batched=True,
        batch_size=64 if pack_to_seconds else 16,  # packing joins utterances within one map batch
        num_proc=num_proc if num_proc > 1 and len(utterances) >= 2 * num_proc else None,
        fn_kwargs={
            "tokenizer": tokenizer,
            "checks": checks,
            "strict": report.skips.strict,
            "pack_to_seconds": pack_to_seconds,
            "timestamps": timestamps,
        },
        remove_columns=[c for c in utterances.column_names if c not in KEPT_COLUMNS],
        features=features,
        cache_file_name=str(cache_dir / f"{stem}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=fingerprint,
        desc=f"preparing {report.name}",
    )
    if not is_complete(cache_dir, stem):  # prepared now, not reused: its files are vouched for from here on
        mark_complete(cache_dir, stem, [f["filename"] for f in prepared.cache_files])
    reasons, counts = prepared["skip_reason"], prepared["utterances"]
    bad = [i for i, reason in enumerate(reasons) if reason]
    for index, message in zip(bad, prepared.select(bad)["skip_message"]):
        report.skips.add(reasons[index], message)
    report.read += sum(counts)
    report.kept = sum(counts) - len(bad)  # a skipped row is one utterance
    kept = [i for i, reason in enumerate(reasons) if not reason]
    report.windows = len(kept) if pack_to_seconds else 0
    table = prepared.select(kept)
    report.cache_bytes = sum(os.path.getsize(f["filename"]) for f in prepared.cache_files)
    report.audio_seconds = float(sum(table["duration"]))
    report.timestamped = sum(table["timestamped"])
    flags = [flag for flag in table["implausible"] if flag]
    report.implausible, report.implausible_messages = len(flags), flags[:MAX_MESSAGES_PER_REASON]
    return table


def _fingerprint(utterances: datasets.Dataset, feature_extractor, tokenizer, checks: RowChecks,
                 pack_to_seconds: float, timestamps: TimestampSettings) -> str:
    """A hash of everything that decides the prepared data: rows, the clips' sizes and times, and the settings."""
    digest = hashlib.sha256()
    settings = {
        "version": PREP_VERSION,
        "sampling_rate": feature_extractor.sampling_rate,  # features are not cached: their settings do not count
        "prefix": tokenizer.prefix_tokens,
        **asdict(checks),
        "pack_to_seconds": pack_to_seconds,
        "timestamps": asdict(timestamps),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).digest())
    if utterances.cache_files:  # a Hub dataset already has a content fingerprint
        digest.update(utterances._fingerprint.encode())
        return digest.hexdigest()[:16]
    for row in utterances.select_columns(["id", "audio_path", "text", "origin"]):
        digest.update(json.dumps(row, sort_keys=True).encode())
        try:
            stat = os.stat(row["audio_path"])
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(b"missing")
    bytes_column = utterances["audio_bytes"]
    for blob in bytes_column:
        digest.update(hashlib.sha256(blob or b"").digest())
    return digest.hexdigest()[:16]
