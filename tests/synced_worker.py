"""Run by tests/test_gpu_paths.py under torchrun, 2 CPU processes (gloo): the temperature fallback with
`generate(synced_gpus=True)`, as ZeRO-3's evaluation decodes, when only rank 0 has rows whose text loops; and
a stop signalled on one process only, agreed every `STOP_CHECK_STEPS` steps.

Under synced_gpus every process must call `generate` as often as the others: each generation step all-reduces
a "finished" flag. The texts are the stand-in here (rank 0's always loop, rank 1's never do); the generation is
the loop's own `generate_ids` on a small saved Whisper, synced for real over gloo. The process group times out
after a minute, so a process left waiting fails instead of hanging.

    torchrun --nproc_per_node 2 tests/synced_worker.py MODEL_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from loop.model.decoding import generate_ids
from loop.model.decoding_options import temperature_fallback
from loop.model.encoder_window import full_window_frames
from loop.model.loading import load_for_inference
from loop.model.sharding import any_process
from loop.run.accelerator import build_accelerator
from loop.run.stopping import STOP_CHECK_STEPS, StopRequested, agreed_stop


def main(model_dir: str, output_dir: str) -> None:
    accelerator = build_accelerator("no", timeout_minutes=1)  # WORLD_SIZE 2 and no GPU: gloo on the CPU
    model, _ = load_for_inference(model_dir, max_length=12)
    settings = model.generation_config
    settings.temperature_fallback, settings.fallback_compression_ratio = True, None
    features = torch.randn(2, model.config.num_mel_bins, full_window_frames(model), generator=torch.Generator().manual_seed(0))
    rank = accelerator.process_index
    samples = []

    def sample(rows, temperature):
        samples.append(rows.tolist())
        return generate_ids(model, features[rows], do_sample=True, temperature=temperature, synced_gpus=True)

    def decode_texts(ids):  # rank 0's rows loop at every temperature, rank 1's never
        return ["हा " * 40 if rank == 0 else "नमस्ते दुनिया" for _ in range(len(ids))]

    token_ids = generate_ids(model, features, synced_gpus=True)
    fixed = temperature_fallback(token_ids, decode_texts, sample, settings,
                                 lambda flag: any_process(flag, token_ids.device))
    # A SIGTERM on rank 1 only: both processes see it at the same step, the next multiple of STOP_CHECK_STEPS.
    stop = StopRequested()
    stop.signal_name = "SIGTERM" if rank == 1 else ""
    stops = [step for step in range(1, 2 * STOP_CHECK_STEPS + 1) if agreed_stop(accelerator, stop, step)]
    result = {"samples": samples, "unchanged": torch.equal(fixed, token_ids), "stops": stops}
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:3])
