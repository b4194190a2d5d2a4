"""A run's splits as shards: written once by `scripts/prepare_data.py --shards DIR` (`write_shards`), read by a run
with `data.source: shards` and `data.path: DIR` (`shard_datasets`).

`DIR/train/` holds the training rows (the selection slice left out, packed and timestamped as `data.*` says),
`DIR/selection/` the speaker-disjoint selection slice and `DIR/test/` the held-out split, each a folder of shards
with its index (`loop.data.shards`). Selection and test are read whole into memory, so evaluation scores every
utterance exactly once as on the cached path; training rows are read whole too, or streamed with
`data.streaming: true` (`loop.data.streaming`): then no process ever holds more than its shuffle buffer.
"""

from __future__ import annotations

from loop.config import RunConfig
from loop.data.mixing import entry_tokenizer, mix_training_rows
from loop.data.no_speech import add_no_speech_rows
from loop.data.prepare import SplitReport
from loop.data.rows import RowChecks
from loop.data.shard_writer import write_split_shards
from loop.data.shards import ShardIndex, check_settings, join, read_index, read_split
from loop.data.sources import DataError
from loop.data.splits import PreparedData, prepare_settings, read_split_rows
from loop.data.streaming import StreamSource
from loop.data.timestamp_labels import TimestampSettings

SELECTION, TEST, TRAIN = "selection", "test", "train"


def write_shards(config: RunConfig, processor, max_label_length: int, url: str,
                 shard_utterances: int) -> dict[str, ShardIndex]:
    """Prepares the run's three splits into shard folders under `url`; returns their indexes. A killed run is
    resumed by running it again: finished shards are kept."""
    data, rows = config.data, read_split_rows(config)
    reports = rows.reports()
    settings = prepare_settings(data, max_label_length)
    chunk = processor.feature_extractor.chunk_length

    def checks(keep_implausible: bool) -> RowChecks:
        return RowChecks(max_duration_s=min(settings["max_duration_s"], chunk), max_label_length=max_label_length,
                         min_duration_s=data.min_duration_s, min_chars_per_second=data.min_chars_per_second,
                         max_chars_per_second=data.max_chars_per_second, keep_implausible=keep_implausible)

    common = {"shard_utterances": shard_utterances, "num_proc": data.num_proc, "source": data.path}
    written = {TRAIN: write_split_shards(rows.train, join(url, TRAIN), TRAIN, processor.tokenizer, reports["train"],
                                         checks(False), pack_to_seconds=min(data.pack_to_seconds, chunk),
                                         timestamps=TimestampSettings(data.timestamp_fraction, config.train.seed),
                                         **common)}
    if config.eval.select_on != "test":
        written[SELECTION] = write_split_shards(rows.selection, join(url, SELECTION), SELECTION, processor.tokenizer,
                                                reports["selection"], checks(False), **common)
    written[TEST] = write_split_shards(rows.test, join(url, TEST), TEST, processor.tokenizer, reports["test"],
                                       checks(True), **common)
    return written


def split_index(url: str, split: str, tokenizer) -> ShardIndex:
    index = read_index(join(url, split))
    check_settings(index, tokenizer)
    return index


def shard_datasets(config: RunConfig, processor, max_label_length: int) -> PreparedData:
    """The run's splits from the shard folder `data.path`: selection and test whole, training whole or (with
    `data.streaming`) as stream sources, with each `data.mix` entry that is a shard folder too."""
    data, tokenizer = config.data, processor.tokenizer
    test_index = split_index(data.path, TEST, tokenizer)
    test = capped(read_split(test_index, data.verify_shards), data.max_eval_samples)
    reports = {TEST: SplitReport.from_dict(TEST, test_index.report)}
    if config.eval.select_on == "test":
        selection, selection_split = test, f"{TEST} (recipe mode: test used for model selection)"
        reports[SELECTION] = reports[TEST]
    else:
        try:
            selection_index = split_index(data.path, SELECTION, tokenizer)
        except DataError as error:
            raise DataError(f"{error}; with eval.select_on=test the test split selects the model") from error
        selection = capped(read_split(selection_index, data.verify_shards), data.max_eval_samples)
        reports[SELECTION] = SplitReport.from_dict(SELECTION, selection_index.report)
        selection_split = f"dev_slice ({len(selection)} rows, written with the shards)"
    train_index = split_index(data.path, TRAIN, tokenizer)
    reports[TRAIN] = SplitReport.from_dict(TRAIN, train_index.report)
    if train_index.rows == 0:
        raise DataError(f"{train_index.url} holds no training rows ({reports[TRAIN].summary()})")
    mixed = sum(entry.weight for entry in data.mix)
    if data.streaming:
        sources = [StreamSource(TRAIN, train_index, 1 - mixed)]
        for entry in data.mix:
            index = split_index(entry.path, TRAIN, entry_tokenizer(processor.tokenizer, entry, config))
            reports[f"train.{entry.name}"] = SplitReport.from_dict(f"train.{entry.name}", index.report)
            sources.append(StreamSource(f"train.{entry.name}", index, entry.weight))
        empty = test.select([])
        return PreparedData(empty, selection, test, selection_split, reports, stream=tuple(sources))
    train = add_no_speech_rows(read_split(train_index, data.verify_shards), data.no_speech_fraction,
                               data.no_speech_dir, config.train.seed, tokenizer, reports[TRAIN], data.cache_dir)
    train, parts = mix_training_rows(config, processor, train, reports, prepare_settings(data, max_label_length))
    return PreparedData(train, selection, test, selection_split, reports, parts)


def capped(table, rows: int):
    """The first `rows` rows of an evaluation split (`data.max_eval_samples`; 0: all)."""
    return table.select(range(min(rows, len(table)))) if rows else table


def shard_eval_split(config: RunConfig, processor, split: str):
    """One split of the shard folder `data.path` for standalone evaluation, and its report."""
    index = split_index(config.data.path, split, processor.tokenizer)
    return capped(read_split(index, config.data.verify_shards), config.data.max_eval_samples), \
        SplitReport.from_dict(split, index.report)

