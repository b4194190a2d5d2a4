# Sourced by scripts/quickstart.sh and scripts/test.sh (and by you: `. scripts/setup.sh`): makes sure a Python
# environment with torch and this package exists, activates it, and moves to the project root.
#   - the active virtual environment if there is one, else $WHISPER_LOOP_VENV, else .venv (created if missing);
#   - torch first, if it is not importable: $TORCH_SPEC (default torch==2.13.0; on a GPU machine give the build
#     for your CUDA, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128");
#   - then the package in editable mode with its test extra (pip install -e ".[test]"), skipped when
#     pyproject.toml has not changed since the last install.
# No `set -e` here: a sourced script would take your shell with it on the first error; each step returns instead.
whisper_loop_setup() {
  local root venv stamp wanted
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    venv="${WHISPER_LOOP_VENV:-$root/.venv}"
    if [ ! -x "$venv/bin/python" ]; then
      echo "setup: creating a virtual environment in $venv"
      python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip || return 1
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate" || return 1
  fi
  if ! python -c "import torch" 2>/dev/null; then
    echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
    # shellcheck disable=SC2086
    python -m pip install -q ${TORCH_SPEC:-torch==2.13.0} > "$VIRTUAL_ENV/.whisper-loop-install.log" 2>&1 \
      || { cat "$VIRTUAL_ENV/.whisper-loop-install.log"; return 1; }
  fi
  stamp="$VIRTUAL_ENV/.whisper-loop-installed"
  wanted="$(sha256sum < "$root/pyproject.toml" | cut -d' ' -f1) $root"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing whisper-loop and its dependencies (pip install -e .[test])"
    python -m pip install -q -e "$root[test]" > "$VIRTUAL_ENV/.whisper-loop-install.log" 2>&1 \
      || { cat "$VIRTUAL_ENV/.whisper-loop-install.log"; return 1; }
    echo "$wanted" > "$stamp"
  fi
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
  export TOKENIZERS_PARALLELISM=false
  cd "$root" || return 1
}
whisper_loop_setup
