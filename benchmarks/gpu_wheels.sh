#!/usr/bin/env bash
# Builds the folder of wheels benchmarks/gpu_probe.py installs on a GPU machine that has a CUDA torch but no package
# registry: every Python package the loop needs except torch (and its CUDA libraries), at the versions installed
# here, for CPython 3.12 on x86-64 Linux. The probe installs from it only what the machine lacks or has older,
# with --no-deps into a folder of its own, so the machine's torch is never replaced.
#   bash benchmarks/gpu_wheels.sh .whl            # about 33 MB
#   bash benchmarks/gpu_wheels.sh .whl --qlora    # + bitsandbytes (43 MB), for the probe's QLoRA step
#   bash benchmarks/gpu_wheels.sh .whl --pyarrow  # + pyarrow (datasets needs >= 24), when the machine's is older
# Run it where pip reaches PyPI, in the environment the tests pass in (the versions are read from it).
set -euo pipefail
folder="${1:?usage: bash benchmarks/gpu_wheels.sh FOLDER [--qlora] [--pyarrow]}"
shift
packages=(transformers datasets accelerate peft tokenizers huggingface_hub safetensors hf-xet regex jiwer rapidfuzz
          soundfile cffi pycparser soxr dill multiprocess xxhash fsspec kernels typer)
for option in "$@"; do
    case "$option" in
        --qlora) packages+=(bitsandbytes) ;;
        --pyarrow) packages+=(pyarrow) ;;
        *) echo "unknown option $option" >&2; exit 2 ;;
    esac
done
pinned=()
for name in "${packages[@]}"; do
    version="$(python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
    pinned+=("$name${version:+==$version}")
done
mkdir -p "$folder"
platforms=()
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${platforms[@]}" -d "$folder" "${pinned[@]}"
du -sh "$folder"
