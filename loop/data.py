"""Utterances -> model-ready examples: log-mel `input_features`, Whisper `labels`, duration; cached by `datasets`.

Preparation runs as a batched `datasets.map` (with `num_proc` workers) into an Arrow cache file whose name is a
fingerprint of the inputs (rows, clip sizes and times) and of the settings (feature extractor, tokenizer, limits):
a second run with the same inputs reuses the file instead of decoding the audio again. Rows that cannot be used
are kept through the map with a `skip_reason`, then counted and dropped, so one bad clip never ends a preparation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from loop.audio import SAMPLE_RATE, AudioError, decode_audio
from loop.config import RunConfig
from loop.features import log_mel_features
from loop.files import write_json_atomic
from loop.sources import DataError, SkipLog, load_utterances

PREP_VERSION = 3  # bump when _prepare_batch changes what it writes, so old caches are not reused
KEPT_COLUMNS = ("id", "audio_path", "text", "client_id")
DEFAULT_CACHE_DIR = Path("~/.cache/whisper-loop").expanduser()


@dataclass
class SplitReport:
    """What happened to one split's rows: how many were read and kept, and why the others were skipped."""

    name: str
    read: int = 0
    kept: int = 0
    skips: SkipLog = field(default_factory=SkipLog)
    windows: int = 0
    """Rows the kept utterances were packed into (0: not packed, one row per utterance)."""

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, **({"windows": self.windows} if self.windows else {}),
                **self.skips.as_dict()}

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skips.counts.items())) or "none"
        examples = [f"\n    {message}" for messages in self.skips.messages.values() for message in messages[:3]]
        packed = f" (packed into {self.windows} windows)" if self.windows else ""
        return f"{self.name}: {self.kept} of {self.read} utterances kept{packed}; skipped: {skipped}" + "".join(examples)


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
) -> datasets.Dataset:
    """Decodes, extracts features and tokenizes `utterances`; returns only the usable rows.

    Columns of the result: `input_features` (n_mels, n_frames) float32, `labels` (token ids, with Whisper's
    prefix `<|startoftranscript|><|lang|><|task|><|notimestamps|>` and `<|endoftext|>`), `duration` (seconds),
    `utterances` (how many utterances the row holds), and `id`, `audio_path`, `text`, `client_id` for reports.

    With `pack_to_seconds`, consecutive usable utterances are joined into one row while their audio fits that many
    seconds and their joined transcript fits `max_label_length` tokens (see `pack_groups`); a packed row's `id`,
    `audio_path` and `client_id` are its utterances' values joined by " + ".
    """
    n_mels, n_frames = feature_extractor.feature_size, feature_extractor.nb_max_frames
    max_duration_s = min(max_duration_s, feature_extractor.chunk_length)
    pack_to_seconds = min(pack_to_seconds, feature_extractor.chunk_length)
    fingerprint = _fingerprint(utterances, feature_extractor, tokenizer, max_duration_s, max_label_length,
                               pack_to_seconds)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "input_features": datasets.Array2D((n_mels, n_frames), "float32"),
            "labels": datasets.List(datasets.Value("int32")),
            "duration": datasets.Value("float32"),
            "utterances": datasets.Value("int32"),
            "skip_reason": datasets.Value("string"),
            "skip_message": datasets.Value("string"),
            **{name: datasets.Value("string") for name in KEPT_COLUMNS},
        }
    )
    if len(utterances) == 0:  # `map` hands an empty table back unchanged, without the prepared columns
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    prepared = utterances.map(
        _prepare_batch,
        batched=True,
        batch_size=64 if pack_to_seconds else 16,  # packing joins utterances within one map batch
        num_proc=num_proc if num_proc > 1 and len(utterances) >= 2 * num_proc else None,
        with_rank=True,
        fn_kwargs={
            "feature_extractor": feature_extractor,
            "tokenizer": tokenizer,
            "max_duration_s": max_duration_s,
            "max_label_length": max_label_length,
            "strict": report.skips.strict,
            "pack_to_seconds": pack_to_seconds,
        },
        remove_columns=[c for c in utterances.column_names if c not in KEPT_COLUMNS],
        features=features,
        cache_file_name=str(cache_dir / f"{report.name}-{fingerprint}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=fingerprint,
        desc=f"preparing {report.name}",
    )
    reasons, counts = prepared["skip_reason"], prepared["utterances"]
    bad = [i for i, reason in enumerate(reasons) if reason]
    for index, message in zip(bad, prepared.select(bad)["skip_message"]):
        report.skips.add(reasons[index], message)
    report.read += sum(counts)
    report.kept = sum(counts) - len(bad)  # a skipped row is one utterance
    kept = [i for i, reason in enumerate(reasons) if not reason]
    report.windows = len(kept) if pack_to_seconds else 0
    return prepared.select(kept)


def _prepare_batch(batch, rank, feature_extractor, tokenizer, max_duration_s, max_label_length, strict,
                   pack_to_seconds=0.0) -> dict:
    """Batched map function: one pass over a map batch; bad rows get a `skip_reason` and zero features. With
    `pack_to_seconds` the usable rows come back packed (fewer rows), each bad row as it was."""
    if rank is not None:
        # A forked worker must not use the OpenMP pool it inherited from a parent that already ran torch ops:
        # GNU OpenMP is not fork-safe and the STFT would hang. The workers are the parallelism here.
        torch.set_num_threads(1)
    size = len(batch["text"])
    texts = [text.strip() for text in batch["text"]]
    reasons, messages, waveforms = [""] * size, [""] * size, [None] * size
    for i in range(size):
        origin = batch["origin"][i]
        try:
            source = batch["audio_bytes"][i] or batch["audio_path"][i]
            if not source:
                raise AudioError("missing_clip", "no audio given")
            waveforms[i] = decode_audio(source)
        except AudioError as error:
            reasons[i], messages[i] = error.reason, f"{origin}: {error}"
            continue
        duration = len(waveforms[i]) / SAMPLE_RATE
        if not texts[i]:
            reasons[i], messages[i] = "empty_transcript", f"{origin}: transcript is empty"
        elif duration > max_duration_s:
            reasons[i], messages[i] = "too_long", f"{origin}: {duration:.1f} s of audio is over the {max_duration_s:g} s limit"
    good = [i for i in range(size) if not reasons[i]]
    labels = [[] for _ in range(size)]
    for i, ids in zip(good, tokenizer([texts[i] for i in good]).input_ids if good else []):
        if len(ids) > max_label_length:
            reasons[i] = "labels_too_long"
            messages[i] = f"{batch['origin'][i]}: {len(ids)} label tokens, more than the model's {max_label_length}"
        else:
            labels[i] = ids
    if strict and any(reasons):
        first = next(i for i in range(size) if reasons[i])
        raise DataError(f"{messages[first]} [{reasons[first]}] (data.strict is on; turn it off to skip and count bad rows)")
    good = [i for i in range(size) if not reasons[i]]
    # Output rows, in input order: a group of one or more usable rows (joined when packing), or one bad row.
    groups = pack_groups(good, [0.0 if w is None else len(w) / SAMPLE_RATE for w in waveforms], texts, tokenizer,
                         pack_to_seconds, max_label_length) if pack_to_seconds else [[i] for i in good]
    groups = sorted(groups + [[i] for i in range(size) if reasons[i]])
    waveforms = [np.concatenate([waveforms[i] for i in group]) if len(group) > 1 else waveforms[group[0]]
                 for group in groups]
    joined_texts = [" ".join(texts[i] for i in group) for group in groups]
    labels = [tokenizer(text).input_ids if len(group) > 1 else labels[group[0]]
              for group, text in zip(groups, joined_texts)]
    reasons, messages = [reasons[group[0]] for group in groups], [messages[group[0]] for group in groups]
    good = [g for g, reason in enumerate(reasons) if not reason]
    n_mels, n_frames = feature_extractor.feature_size, feature_extractor.nb_max_frames
    input_features = np.zeros((len(groups), n_mels, n_frames), dtype=np.float32)
    if good:
        # One STFT for the whole batch, over the audio only: the feature extractor's values without transforming
        # the silence that pads each clip to the 30-s window (loop/features.py).
        input_features[good] = log_mel_features([waveforms[g] for g in good], feature_extractor)
    return {
        "input_features": input_features,
        "labels": labels,
        "duration": [0.0 if w is None else len(w) / SAMPLE_RATE for w in waveforms],
        "utterances": [len(group) for group in groups],
        "skip_reason": reasons,
        "skip_message": messages,
        **{name: [" + ".join(str(batch[name][i] or "") for i in group) if len(group) > 1 else batch[name][group[0]]
                  for group in groups] for name in KEPT_COLUMNS if name != "text"},
        "text": joined_texts,
    }


def pack_groups(rows: list[int], durations: list[float], texts: list[str], tokenizer, pack_to_seconds: float,
                max_label_length: int) -> list[list[int]]:
    """Greedy packing of consecutive `rows` (distil-whisper's way of filling Whisper's 30-s window): a group grows
    while its audio stays within `pack_to_seconds` and its joined transcript within `max_label_length` tokens; a
    row that fits neither starts the next group. Every row lands in exactly one group, in order."""
    groups: list[list[int]] = []
    seconds = 0.0
    for row in rows:
        if groups and seconds + durations[row] <= pack_to_seconds:
            joined = " ".join(texts[i] for i in groups[-1] + [row])
            if len(tokenizer(joined).input_ids) <= max_label_length:
                groups[-1].append(row)
                seconds += durations[row]
                continue
        groups.append([row])
        seconds = durations[row]
    return groups


def _fingerprint(utterances: datasets.Dataset, feature_extractor, tokenizer, max_duration_s, max_label_length,
                 pack_to_seconds) -> str:
    """A hash of everything that decides the prepared data: rows, the clips' sizes and times, and the settings."""
    digest = hashlib.sha256()
    settings = {
        "version": PREP_VERSION,
        "features": feature_extractor.to_dict(),
        "prefix": tokenizer.prefix_tokens,
        "max_duration_s": max_duration_s,
        "max_label_length": max_label_length,
        "pack_to_seconds": pack_to_seconds,
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


def speaker_disjoint_slice(utterances: datasets.Dataset, size: int, seed: int) -> tuple[list[int], list[int]]:
    """Splits row indices into (rest, selection) with no speaker in both; selection has at most `size` rows.

    Rows without a `client_id` count as speakers of their own. Speakers are drawn in a seeded order and taken
    while they fit, so one prolific speaker cannot fill the slice. If none fits, the first `size` rows of the
    smallest speaker form the selection and that speaker's other rows are left out of both parts.
    """
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for index, speaker in enumerate(utterances["client_id"]):
        by_speaker[speaker or f"row-{index}"].append(index)
    speakers = sorted(by_speaker)
    random.Random(seed).shuffle(speakers)
    chosen, total = [], 0
    for speaker in speakers:
        if total >= size:
            break
        if total + len(by_speaker[speaker]) <= size:
            chosen.append(speaker)
            total += len(by_speaker[speaker])
    if size and not chosen and speakers:
        chosen = [min(speakers, key=lambda s: len(by_speaker[s]))]
    taken = {i for s in chosen for i in by_speaker[s]}
    selection = sorted(taken)[:size]  # only the fallback speaker can be larger than `size`
    return [i for i in range(len(utterances)) if i not in taken], selection


@dataclass
class PreparedData:
    """The three prepared tables of a run and what happened to their rows."""

    train: datasets.Dataset
    selection: datasets.Dataset
    test: datasets.Dataset
    selection_split: str
    reports: dict[str, SplitReport]

    def report_dict(self) -> dict:
        return {name: report.as_dict() for name, report in self.reports.items()}

    def write_report(self, output_dir: str | Path) -> Path:
        """`<output_dir>/data_report.json`: rows read, kept and skipped by reason, per split."""
        return write_json_atomic(Path(output_dir) / "data_report.json", self.report_dict())


def build_datasets(config: RunConfig, processor, max_label_length: int, prepare_train: bool = True) -> PreparedData:
    """Reads and prepares train (minus the selection slice), selection and test, as the run config says."""
    data = config.data
    skips = {name: SkipLog(data.strict) for name in ("train", "selection", "test")}
    train_parts = [load_utterances(data, split, skips["train"]) for split in data.train_splits]
    train_rows = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    test_rows = load_utterances(data, data.eval_split, skips["test"])
    if data.max_eval_samples:
        test_rows = test_rows.select(range(min(data.max_eval_samples, len(test_rows))))
    if config.eval.select_on == "test":
        selection_rows, selection_split = test_rows, f"{data.eval_split} (recipe mode: test used for model selection)"
    else:
        rest, chosen = speaker_disjoint_slice(train_rows, data.selection_size, config.train.seed)
        if not chosen:
            raise DataError("data.selection_size is 0 but eval.select_on=dev_slice needs a selection slice")
        if data.max_eval_samples:
            chosen = chosen[: data.max_eval_samples]
        selection_rows, train_rows = train_rows.select(chosen), train_rows.select(rest)
        selection_split = f"dev_slice ({len(chosen)} utterances, speaker-disjoint from training)"
    if data.max_train_samples:
        train_rows = train_rows.select(range(min(data.max_train_samples, len(train_rows))))
    common = {
        "max_duration_s": data.max_duration_s,
        "max_label_length": max_label_length,
        "num_proc": data.num_proc,
        "cache_dir": data.cache_dir,
    }
    fe, tok = processor.feature_extractor, processor.tokenizer
    reports = {name: SplitReport(name, skips=skips[name]) for name in skips}
    for name in reports:  # rows skipped while reading count as read
        reports[name].read = sum(skips[name].counts.values())
    train = (prepare(train_rows, fe, tok, reports["train"], pack_to_seconds=data.pack_to_seconds, **common)
             if prepare_train else train_rows)
    if config.eval.select_on == "test":
        # One table and one report: the test split's rows (and its read-time skips) are the selection's.
        test = selection = prepare(test_rows, fe, tok, reports["test"], **common)
        reports["selection"] = reports["test"]
    else:
        selection = prepare(selection_rows, fe, tok, reports["selection"], **common)
        test = prepare(test_rows, fe, tok, reports["test"], **common)
    if prepare_train and len(train) == 0:
        raise DataError(f"no usable training utterances ({reports['train'].summary()})")
    return PreparedData(train, selection, test, selection_split, reports)


def build_eval_split(config: RunConfig, processor, max_label_length: int, split: str | None = None) -> tuple[datasets.Dataset, SplitReport]:
    """One prepared split for standalone evaluation (default: `data.eval_split`), and its report."""
    split = split or config.data.eval_split
    report = SplitReport(split, skips=SkipLog(config.data.strict))
    rows = load_utterances(config.data, split, report.skips)
    report.read = sum(report.skips.counts.values())
    if config.data.max_eval_samples:
        rows = rows.select(range(min(config.data.max_eval_samples, len(rows))))
    table = prepare(rows, processor.feature_extractor, processor.tokenizer, report,
                    max_duration_s=config.data.max_duration_s, max_label_length=max_label_length,
                    num_proc=config.data.num_proc, cache_dir=config.data.cache_dir)
    return table, report
