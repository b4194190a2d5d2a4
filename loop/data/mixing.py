"""Data mixing (`data.mix`): more sources of training rows beside the data source, each at its share of every epoch.

Fine-tuning on one language fades the others; a share of the languages to keep in every step holds them. Each
`MixSource` is read like the data source (`loop.data.sources`) and prepared (`loop.data.prepare`) with a tokenizer whose
label prefix carries the source's own language (an English row is labelled `<|en|>`, not the run's `<|hi|>`),
into a cache and a report of its own (`train.<name>` in data_report.json: read, kept, skipped by reason). No
selection slice is cut from a mixed source: model selection and the test split stay the data source's.

The training table is the data source's prepared rows (no-speech rows included) followed by each mixed source's;
`TrainPart`s say where each part lies and what share of an epoch it gets, and `loop.data.samplers.mixed_epoch_order`
draws an epoch from them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import datasets

from loop.config import MixSource, RunConfig, source_of
from loop.data.prepare import SplitReport, prepare
from loop.data.shards import check_settings, join, read_index, read_split
from loop.data.sources import DataError, SkipLog, load_utterances, split_location
from loop.languages import language_code


@dataclass(frozen=True)
class TrainPart:
    """One source's rows in the training table: `rows` consecutive rows, after the parts before it."""

    name: str
    """The report's key: `train` for the data source, `train.<name>` for a `data.mix` entry."""
    rows: int
    """Prepared rows of this source in the table."""
    share: float
    """Share of each epoch's rows drawn from it (the data source's: 1 - the mixed sources' weights)."""
    language: str
    """The language token its labels carry (a Whisper language code)."""


def tokenizer_for(tokenizer, language: str):
    """A copy of `tokenizer` whose label prefix names `language` (task and timestamps as the original's)."""
    copied = copy.deepcopy(tokenizer)
    copied.set_prefix_tokens(language=language)
    return copied


def entry_tokenizer(tokenizer, entry: MixSource, config: RunConfig):
    """The tokenizer whose label prefix a `data.mix` entry's rows carry: its own language's."""
    return tokenizer_for(tokenizer, entry.language or config.model.language)


def prepare_mixed_source(config: RunConfig, entry: MixSource, processor, settings: dict) -> tuple[datasets.Dataset, SplitReport]:
    """One `data.mix` entry's training splits, read, capped at `max_samples` and prepared (packed as the data
    source's rows are) with its language's label prefix; its report is `train.<name>`. A shard folder's
    training rows were prepared when written: they are read whole."""
    if entry.source == "shards":
        index = read_index(join(entry.path, "train"))
        check_settings(index, entry_tokenizer(processor.tokenizer, entry, config))
        return read_split(index, config.data.verify_shards), SplitReport.from_dict(f"train.{entry.name}", index.report)
    language = entry.language or config.model.language
    source = source_of(entry, locale=entry.locale or language_code(language))
    report = SplitReport(f"train.{entry.name}", skips=SkipLog(config.data.strict))
    parts = [load_utterances(source, split, report.skips) for split in entry.train_splits]
    rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    report.read = sum(report.skips.counts.values())
    if entry.max_samples:
        rows = rows.select(range(min(entry.max_samples, len(rows))))
    table = prepare(rows, processor.feature_extractor, entry_tokenizer(processor.tokenizer, entry, config), report,
                    pack_to_seconds=config.data.pack_to_seconds, **settings)
    if len(table) == 0:
        where = ", ".join(split_location(source, split) for split in entry.train_splits)
        raise DataError(f"data.mix entry {entry.name!r}: no usable training rows in {where} ({report.summary()}); "
                        "fix its path or splits, or remove it from data.mix")
    return table, report


def mix_training_rows(config: RunConfig, processor, train: datasets.Dataset, reports: dict[str, SplitReport],
                      settings: dict) -> tuple[datasets.Dataset, list[TrainPart]]:
    """The data source's prepared training rows followed by every `data.mix` source's, and the parts they form;
    each mixed source's report is added to `reports`."""
    mix = config.data.mix
    parts = [TrainPart("train", len(train), 1 - sum(entry.weight for entry in mix),
                       language_code(config.model.language))]
    tables = [train]
    for entry in mix:
        table, report = prepare_mixed_source(config, entry, processor, settings)
        reports[report.name] = report
        tables.append(table)
        parts.append(TrainPart(report.name, len(table), entry.weight,
                               language_code(entry.language or config.model.language)))
    return (datasets.concatenate_datasets(tables) if len(tables) > 1 else train), parts


def mix_report(parts: list[TrainPart]) -> dict:
    """data_report.json's `mix`: each part's rows, share and rows per epoch (`loop.data.samplers.epoch_quotas`)."""
    from loop.data.samplers import epoch_quotas

    quotas = epoch_quotas([part.rows for part in parts], [part.share for part in parts])
    return {"epoch_rows": sum(quotas), "sources": {
        part.name: {"rows": part.rows, "share": round(part.share, 6), "rows_per_epoch": quota,
                    "language": part.language}
        for part, quota in zip(parts, quotas)}}
