"""Fine-tune Whisper: `python scripts/train.py --config quickstart` or
`accelerate launch --config_file accelerate_config.yaml scripts/train.py --config whisper-small-hi --data.path CV_DIR`.

Options: `--config PRESET_OR_YAML`, `--output_dir DIR`, and any `--section.key=value` (`--help` lists them all).
"""

import sys

from loop.cli import make_parser
from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.sources import DataError
from loop.model.loading import ModelLoadError
from loop.run.batch_size import BatchSizeError
from loop.run.checkpoint_integrity import CheckpointError
from loop.run.disk_space import SaveError
from loop.run.lock import FolderInUseError
from loop.ship.model_card import HubUploadError
from loop.train import train


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides, args.output_dir)
        train(config)  # a run stopped by SIGTERM/SIGINT has saved a checkpoint and returns normally
    except (ConfigError, DataError, ModelLoadError, CheckpointError, FolderInUseError, BatchSizeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, HubUploadError, SaveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
