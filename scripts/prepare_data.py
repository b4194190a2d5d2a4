"""Prepare (decode, resample, tokenize, cache the audio) a run's data and report what was skipped.

    python scripts/prepare_data.py --config whisper-small-hi --data.path /data/cv-corpus-17.0-2024-03-15

Training reuses the cached result. Writes data_report.json (kept and skipped rows by reason) to --output_dir.

With --shards DIR (a folder or an fsspec URL: s3://, gs://, hf://), the prepared rows are written there as
Parquet shards of --shard_utterances utterances each, with an index per split (train/, selection/, test/), for
runs with --data.source=shards --data.path=DIR [--data.streaming=true] (docs/data.md). --data.num_proc prepares
shards in parallel; a killed preparation is resumed by running the same command again.
"""

import sys

from transformers import WhisperConfig

from loop.cli import make_parser
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.data.splits import build_datasets
from loop.files import write_json_atomic
from loop.model.loading import ModelLoadError, load_processor, model_location


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, sections=("data", "model"))
    parser.add_argument("--shards", default="", help="write the prepared splits as shards to this folder or URL")
    parser.add_argument("--shard_utterances", type=int, default=2000,
                        help="utterances per shard (default: %(default)s, about 3 hours of Common Voice)")
    args, overrides = parser.parse_known_args(argv)
    if args.shard_utterances < 1:
        parser.error(f"--shard_utterances must be at least 1, got {args.shard_utterances}")
    try:
        config = load_config(args.config, overrides, args.output_dir)
        processor = load_processor(config.model.name_or_path, config.model.language, config.model.task)
        max_labels = WhisperConfig.from_pretrained(model_location(config.model.name_or_path)).max_target_positions
        if args.shards:
            return write(config, processor, max_labels, args.shards, args.shard_utterances)
        data = build_datasets(config, processor, max_labels)
    except (ConfigError, DataError, ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    printed = []
    for report in data.reports.values():
        if not any(report is seen for seen in printed):  # recipe mode: selection and test share one report
            print(report.summary())
            printed.append(report)
    print(f"selection split: {data.selection_split}")
    print(f"wrote {data.write_report(config.output_dir)}")
    return 0


def write(config, processor, max_labels: int, url: str, shard_utterances: int) -> int:
    from loop.data.shard_splits import write_shards

    if config.data.source == "shards":
        raise ConfigError("--shards writes shards from another source: data.source is already shards")
    indexes = write_shards(config, processor, max_labels, url, shard_utterances)
    for split, index in indexes.items():
        print(f"{split}: {index.rows} rows, {index.hours:.2f} h, {len(index.shards)} shards in {index.url}")
    report = {split: index.report for split, index in indexes.items()}
    print(f"wrote {write_json_atomic(f'{config.output_dir}/data_report.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
