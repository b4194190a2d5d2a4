#!/usr/bin/env bash
# Set up (scripts/setup.sh) and train the offline quickstart: the tiny Whisper in assets/ on the shipped synthetic
# Hindi corpus, on CPU. Extra arguments go to scripts/train.py, e.g. `bash scripts/quickstart.sh --train.max_steps=20`.
. "$(dirname "$0")/setup.sh" || exit 1
exec python scripts/train.py --config quickstart "$@"
