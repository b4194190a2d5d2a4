"""Bitwise-reproducible training (`train.deterministic`).

Where two identical runs differed (found by bisection, docs/training.md): not in the data order, the
augmentation draws, dropout or SpecAugment (all seeded, and restored on resume), nor in fused AdamW, but in one
backward kernel. Whisper's decoder adds its positional embedding as `weight[position_ids]`, an indexing op whose
backward is `index_put_(..., accumulate=True)`. On the CPU, with more than one intra-op thread and at least
`GRAIN_SIZE` (32,768) gradient elements, PyTorch runs that accumulation in parallel with atomic float adds, whose
order, and so whose rounding, changes from run to run. The quickstart's batch (16 rows x ~40 tokens x 128
channels) is over the threshold; the fast test model's (8 x ~30 x 64) is under it, which is why the resume test
was bitwise equal in its own setting. `torch.use_deterministic_algorithms(True)` makes that kernel serial (and
on CUDA picks deterministic kernels for cuBLAS, cuDNN, scatter/index ops and attention backward, or raises for an
op that has none).

Bitwise equality still needs the same machine: the same number of CPU threads (a reduction split over 2 threads
rounds differently from one over 1), the same GPU model, and the same library versions.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's reproducible workspace setting (its docs: ":4096:8" or ":16:8")


def make_deterministic() -> str:
    """Switches torch to deterministic kernels for the rest of the process; returns a line saying so.

    Call it before anything touches CUDA: cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` when it creates its handle, at
    the first matrix product on the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    # Benchmark mode times several cuDNN algorithms on the first batch of each shape and keeps the fastest,
    # which can differ between runs.
    torch.backends.cudnn.benchmark = False
    where = (f"CUDA (CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']})"
             if torch.cuda.is_available() else "CPU")
    return (f"deterministic: torch.use_deterministic_algorithms on, {torch.get_num_threads()} CPU threads, {where}; "
            "bitwise equal to runs with the same thread count, hardware and library versions")
