"""A run's data: the configured source's splits read, the speaker-disjoint selection slice cut from the training
rows, and train, selection and test prepared (loop/data/prepare.py) into one `PreparedData` with a report per split.

Training rows (train and the selection slice) must be plausible: implausible ones are skipped and counted. The
held-out split keeps them, flagged, so its WER is measured on the same utterances as published figures."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from loop.config import DataConfig, RunConfig
from loop.data.mixing import TrainPart, mix_report, mix_training_rows
from loop.data.no_speech import add_no_speech_rows
from loop.data.prepare import SplitReport, prepare
from loop.data.sources import DataError, SkipLog, load_utterances, split_location
from loop.data.timestamp_labels import TimestampSettings
from loop.files import write_json_atomic


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
    train_parts: list[TrainPart] = field(default_factory=list)
    """The sources lying end to end in `train` and their shares of an epoch (`data.mix`); empty when not prepared."""
    stream: tuple = ()
    """With `data.streaming`: the training sources streamed from shards (`loop.data.streaming.StreamSource`);
    `train` is then empty."""
    stream_skips: dict = field(default_factory=dict)
    """With `data.streaming`: the rows skipped while streaming, merged over the processes at the last checkpoint."""

    def report_dict(self) -> dict:
        mixed = {"mix": mix_report(self.train_parts)} if len(self.train_parts) > 1 else {}
        streamed = {"streaming": {"sources": {s.name: {"rows": s.index.rows, "share": round(s.share, 6),
                                                       "shards": len(s.index.shards), "url": s.index.url}
                                              for s in self.stream}, **self.stream_skips}} if self.stream else {}
        return {**{name: report.as_dict() for name, report in self.reports.items()}, **mixed, **streamed}

    def write_report(self, output_dir: str | Path) -> Path:
        """`<output_dir>/data_report.json`: rows read, kept and skipped by reason, per split."""
        return write_json_atomic(Path(output_dir) / "data_report.json", self.report_dict())


def prepare_settings(data: DataConfig, max_label_length: int) -> dict:
    """`prepare`'s settings from the data options, the same for every split (packing aside)."""
    return {
        "max_duration_s": data.max_duration_s,
        "max_label_length": max_label_length,
        "min_duration_s": data.min_duration_s,
        "min_chars_per_second": data.min_chars_per_second,
        "max_chars_per_second": data.max_chars_per_second,
        "num_proc": data.num_proc,
        "cache_dir": data.cache_dir,
    }


def empty_training_splits(data: DataConfig, skips: SkipLog) -> str:
    """The error for training splits without a single row: which files (or Hub splits) they are, and what to do."""
    files = [split_location(data, split) for split in data.train_splits]
    named = files[0] if len(files) == 1 else ", ".join(files[:-1]) + " and " + files[-1]
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(skips.counts.items()))
    return (f"{named} {'holds' if len(files) == 1 else 'hold'} no usable rows"
            + (f" (skipped while reading: {skipped})" if skipped else "")
            + ": nothing to train on; point data.path at a release whose training splits have rows, "
              "or name others in data.train_splits")


@dataclass
class SplitRows:
    """A run's utterances before preparation: training rows (less the selection slice), selection and test rows,
    and the rows each lost while being read."""

    train: datasets.Dataset
    selection: datasets.Dataset
    test: datasets.Dataset
    selection_split: str
    skips: dict[str, SkipLog]

    def reports(self) -> dict[str, SplitReport]:
        """A report per split, counting the rows skipped while reading as read."""
        reports = {name: SplitReport(name, skips=self.skips[name]) for name in self.skips}
        for report in reports.values():
            report.read = sum(report.skips.counts.values())
        return reports


def read_split_rows(config: RunConfig) -> SplitRows:
    """Reads train (minus the speaker-disjoint selection slice), selection and test utterances, as the run config
    says; in recipe mode (`eval.select_on: test`) the selection rows are the test rows."""
    data = config.data
    skips = {name: SkipLog(data.strict) for name in ("train", "selection", "test")}
    train_parts = [load_utterances(data, split, skips["train"]) for split in data.train_splits]
    train_rows = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    if len(train_rows) == 0:
        raise DataError(empty_training_splits(data, skips["train"]))
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
    return SplitRows(train_rows, selection_rows, test_rows, selection_split, skips)


def build_datasets(config: RunConfig, processor, max_label_length: int, prepare_train: bool = True) -> PreparedData:
    """Reads and prepares train (minus the selection slice), selection and test, as the run config says; from a
    shard folder (`data.source: shards`), reads them as they were prepared (`loop.data.shard_splits`)."""
    if config.data.source == "shards":
        from loop.data.shard_splits import shard_datasets

        return shard_datasets(config, processor, max_label_length)
    data = config.data
    rows = read_split_rows(config)
    train_rows, selection_rows, test_rows = rows.train, rows.selection, rows.test
    selection_split = rows.selection_split
    reports = rows.reports()
    common = prepare_settings(data, max_label_length)
    fe, tok = processor.feature_extractor, processor.tokenizer
    timestamps = TimestampSettings(data.timestamp_fraction, config.train.seed)
    train = (prepare(train_rows, fe, tok, reports["train"], pack_to_seconds=data.pack_to_seconds,
                     timestamps=timestamps, **common)
             if prepare_train else train_rows)
    if config.eval.select_on == "test":
        # One table and one report: the test split's rows (and its read-time skips) are the selection's.
        test = selection = prepare(test_rows, fe, tok, reports["test"], keep_implausible=True, **common)
        reports["selection"] = reports["test"]
    else:
        selection = prepare(selection_rows, fe, tok, reports["selection"], **common)
        test = prepare(test_rows, fe, tok, reports["test"], keep_implausible=True, **common)
    if prepare_train and len(train) == 0:
        raise DataError(f"no usable training utterances ({reports['train'].summary()})")
    parts = []
    if prepare_train:  # no-speech rows join the data source's rows; mixed sources come after them
        train = add_no_speech_rows(train, data.no_speech_fraction, data.no_speech_dir, config.train.seed, tok,
                                   reports["train"], data.cache_dir)
        train, parts = mix_training_rows(config, processor, train, reports, common)
    return PreparedData(train, selection, test, selection_split, reports, parts)


def build_eval_split(config: RunConfig, processor, max_label_length: int, split: str | None = None) -> tuple[datasets.Dataset, SplitReport]:
    """One prepared split for standalone evaluation (default: `data.eval_split`), and its report; from a shard
    folder, its split folder of that name (`test`, `selection`)."""
    split = split or config.data.eval_split
    if config.data.source == "shards":
        from loop.data.shard_splits import shard_eval_split

        return shard_eval_split(config, processor, split)
    report = SplitReport(split, skips=SkipLog(config.data.strict))
    rows = load_utterances(config.data, split, report.skips)
    report.read = sum(report.skips.counts.values())
    if config.data.max_eval_samples:
        rows = rows.select(range(min(config.data.max_eval_samples, len(rows))))
    table = prepare(rows, processor.feature_extractor, processor.tokenizer, report, keep_implausible=True,
                    **prepare_settings(config.data, max_label_length))
    return table, report
