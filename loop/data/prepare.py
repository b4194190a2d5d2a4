"""Utterances -> model-ready rows: 16-kHz audio, Whisper `labels`, duration; cached by `datasets`.

Preparation runs as a batched `datasets.map` (with `num_proc` workers) into an Arrow cache file whose name is a
fingerprint of the inputs (rows, clip sizes and times) and of the settings (feature extractor, tokenizer, limits):
a second run with the same inputs reuses the file instead of decoding the audio again, once its preparation has
finished (`loop.data.cache_files`). Rows that cannot be used are kept through the map with a `skip_reason`, then counted
and dropped, so one bad clip never ends a preparation.
Implausible rows (too little audio, or a transcript too fast or too slow for it: a truncated clip, a mismatched
transcript) are skipped the same way in training splits; evaluation keeps them, flagged in an `implausible` column,
so its WER stays comparable with published figures on the same split.

Inside a map batch each row is one `Record`: `check_row` decodes and tokenizes it or says why it is skipped,
`pack_groups` and `join_rows` join consecutive usable rows (with `pack_to_seconds`), and `output_columns` writes the
columns. The cache holds the decoded, resampled audio as int16 with a per-row scale (`loop.data.audio.quantize`), not
features: the loop computes log-mel features per batch on the accelerator (`loop.model.features.LogMel`), so the cache
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

from loop.data.cache_files import cached_map
from loop.data.rows import (
    KEPT_COLUMNS,
    NO_TIMESTAMPS,
    Record,
    RowChecks,
    add_timestamps,
    check_row,
    output_columns,
    pack_batch,
)
from loop.data.sources import MAX_MESSAGES_PER_REASON, SkipLog, strict_error
from loop.data.timestamp_labels import (
    TimestampSettings,
    TimestampTokens,
)

PREP_VERSION = 6  # bump when prepare_batch changes what it writes, so old caches are not reused
DEFAULT_CACHE_DIR = Path("~/.cache/whisper-loop").expanduser()
PREPARED_FEATURES = datasets.Features(  # what `prepare` writes; `loop.data.no_speech` writes the same columns
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

    @classmethod
    def from_dict(cls, name: str, values: dict) -> SplitReport:
        """The report `as_dict` wrote (a shard folder's index keeps its split's)."""
        report = cls(name, read=values.get("read", 0), kept=values.get("kept", 0), windows=values.get("windows", 0),
                     implausible=values.get("implausible", 0), no_speech=values.get("no_speech", 0),
                     implausible_messages=list(values.get("implausible_messages", [])),
                     timestamped=values.get("timestamped", 0))
        report.skips.merge(values)
        return report

    def add(self, other: SplitReport) -> None:
        """Adds the counts of another part of the split (a shard's) to this report."""
        for name in ("read", "kept", "windows", "implausible", "no_speech", "timestamped", "audio_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        room = MAX_MESSAGES_PER_REASON - len(self.implausible_messages)
        self.implausible_messages += other.implausible_messages[:max(0, room)]
        self.skips.merge(other.skips.as_dict())

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skips.counts.items())) or "none"
        examples = [f"\n    {message}" for messages in self.skips.messages.values() for message in messages[:3]]
        examples += [f"\n    flagged: {message}" for message in self.implausible_messages[:3]]
        packed = f" (packed into {self.windows} windows)" if self.windows else ""
        flagged = f"; flagged as implausible (kept): {self.implausible}" if self.implausible else ""
        flagged += f"; plus {self.no_speech} no-speech rows" if self.no_speech else ""
        return (f"{self.name}: {self.kept} of {self.read} utterances kept{packed}; skipped: {skipped}{flagged}"
                + "".join(examples))


def prepare_batch(batch, tokenizer, checks: RowChecks, strict: bool,
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
    16-kHz waveform, `loop.data.audio.dequantize`), `labels` (token ids, with Whisper's
    prefix `<|startoftranscript|><|lang|><|task|><|notimestamps|>` and `<|endoftext|>`), `duration` (seconds),
    `utterances` (how many utterances the row holds), `implausible` (empty, or why the row is implausible: only
    with `keep_implausible`, else such rows are skipped), and `id`, `audio_path`, `text`, `client_id` for reports.

    With `pack_to_seconds`, consecutive usable utterances are joined into one row while their audio fits that many
    seconds and their joined transcript fits `max_label_length` tokens (see `pack_groups`); a packed row's `id`,
    `audio_path` and `client_id` are its utterances' values joined by " + ".

    Every row has `segments`, the (start, end) seconds of each utterance's speech in its audio. With
    `timestamps.fraction` that share of the rows (chosen by `loop.data.timestamp_labels.wants_timestamps`) is `timestamped`:
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
    fingerprint = preparation_fingerprint(utterances, feature_extractor, tokenizer, checks, pack_to_seconds, timestamps)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = PREPARED_FEATURES
    if len(utterances) == 0:  # `map` hands an empty table back unchanged, without the prepared columns
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    prepared = cached_map(
        utterances,
        prepare_batch,
        cache_dir,
        f"{report.name}-{fingerprint}",
        fingerprint,
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
        desc=f"preparing {report.name}",
    )
    reasons = prepared["skip_reason"]
    bad = [i for i, reason in enumerate(reasons) if reason]
    table = prepared.select([i for i, reason in enumerate(reasons) if not reason])
    tally(report, reasons, prepared["utterances"], prepared.select(bad)["skip_message"], table, packed=pack_to_seconds > 0)
    report.cache_bytes = sum(os.path.getsize(f["filename"]) for f in prepared.cache_files)
    return table


def tally(report: SplitReport, reasons: list[str], utterances: list[int], messages: list[str], kept, packed: bool) -> None:
    """Adds prepared rows to `report`: `reasons` and `utterances` of every row, the skip `messages` of the skipped
    ones in order, and `kept` (the usable rows' columns: `duration`, `timestamped`, `implausible`)."""
    bad = [i for i, reason in enumerate(reasons) if reason]
    for index, message in zip(bad, messages):
        report.skips.add(reasons[index], message)
    report.read += sum(utterances)
    report.kept += sum(utterances) - len(bad)  # a skipped row is one utterance
    report.windows += len(reasons) - len(bad) if packed else 0
    report.audio_seconds += float(sum(kept["duration"]))
    report.timestamped += sum(kept["timestamped"])
    flags = [flag for flag in kept["implausible"] if flag]
    report.implausible += len(flags)
    report.implausible_messages += flags[:MAX_MESSAGES_PER_REASON - len(report.implausible_messages)]


def preparation_fingerprint(utterances: datasets.Dataset, feature_extractor, tokenizer, checks: RowChecks,
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
