"""Prepare (decode, resample, tokenize, cache the audio) a run's data and report what was skipped.

    python scripts/prepare_data.py --config whisper-small-hi --data.path /data/cv-corpus-17.0-2024-03-15

Training reuses the cached result. Writes data_report.json (kept and skipped rows by reason) to --output_dir.
"""

import sys

from transformers import WhisperConfig

from loop.cli import make_parser
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.data.splits import build_datasets
from loop.model.loading import ModelLoadError, load_processor, model_location


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, sections=("data", "model"))
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides, args.output_dir)
        processor = load_processor(config.model.name_or_path, config.model.language, config.model.task)
        max_labels = WhisperConfig.from_pretrained(model_location(config.model.name_or_path)).max_target_positions
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


if __name__ == "__main__":
    sys.exit(main())
