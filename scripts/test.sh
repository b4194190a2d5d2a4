#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, as CI does. Extra arguments go to pytest
# (default: -q -m "not slow and not gpu"; `bash scripts/test.sh -m slow` runs the long ones).
. "$(dirname "$0")/setup.sh" || exit 1
if [ "$#" -eq 0 ]; then set -- -q -m "not slow and not gpu"; fi
exec python -m pytest "$@"
