"""Run by tests/test_distributed.py under torchrun, 2 CPU processes (gloo): the loop's evaluation and best/ writing
on a Whisper sharded with torch's FSDP2 (`fully_shard` on every encoder and decoder layer, then the root, as
accelerate_configs/fsdp.yaml wraps it), against the same model unsharded. Accelerate runs FSDP only on
accelerators, so the sharding is applied here by hand; everything after it is the loop's own code.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL_DIR CORPUS_DIR CACHE_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from loop.config.loading import load_config
from loop.data.loaders import eval_dataloader
from loop.data.splits import build_eval_split
from loop.eval.evaluation import evaluate
from loop.eval.timestamps import evaluate_timestamps, evaluate_timestamps_in_step
from loop.model.features import LogMel
from loop.model.loading import load_for_inference, load_model
from loop.model.loss import token_losses
from loop.model.sharding import fsdp2_units, full_parameters
from loop.run.accelerator import build_accelerator
from loop.run.best_model import load_best_for_evaluation, write_best_model
from loop.run.disk_space import weights_bytes


def main(model_dir: str, corpus_dir: str, cache_dir: str, output_dir: str) -> None:
    accelerator = build_accelerator("no")  # WORLD_SIZE 2 and no GPU: gloo on the CPU
    config = load_config(None, [f"--model.name_or_path={model_dir}", f"--data.path={corpus_dir}",
                                "--data.max_eval_samples=6", f"--data.cache_dir={cache_dir}", "--data.num_proc=1",
                                "--eval.generation_max_length=24", "--model.dropout=0"])
    model, processor = load_model(config.model, config.eval)
    with accelerator.main_process_first():
        table, _ = build_eval_split(config, processor, model.config.max_target_positions)
    # batch 2 over 2 processes and 6 rows: the processes decode different rows to different lengths
    loader = accelerator.prepare(eval_dataloader(table, 2, model.config.decoder_start_token_id))
    log_mel = LogMel(processor.feature_extractor)
    args = (loader, accelerator, processor.tokenizer, table["text"], config.model.language)
    plain = evaluate(model, *args, log_mel=log_mel)
    plain_timestamps = evaluate_timestamps(model, processor.tokenizer, table, log_mel, batch_size=2)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plain_bytes = weights_bytes(model)

    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded_bytes = weights_bytes(model)  # every parameter a DTensor now
    # First call after sharding: the evaluation, before any training forward (as with eval.eval_on_start).
    sharded = evaluate(model, *args, log_mel=log_mel)
    # The loop's timestamp evaluation of the sharded model, on both processes (rank 0 alone would wait forever).
    sharded_timestamps = evaluate_timestamps_in_step(accelerator, model, processor.tokenizer, table, log_mel,
                                                     batch_size=2)
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    with full_parameters(model):
        whole = not any(isinstance(p, DTensor) for p in model.parameters())
    write_best_model(accelerator, model, processor, output_dir)  # gathers the shards on the main process

    # A training step on the shards after the evaluation (fused AdamW over DTensors, as the loop's), then evaluate.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = next(iter(loader))
    batch["input_features"] = log_mel(batch["audio"])
    token_losses(model, batch).sum().backward()
    optimizer.step()
    after_step = evaluate(model, *args, log_mel=log_mel)
    # finish()'s evaluation of best/: an ordinary model on this process' device, beside the sharded one.
    best_model = load_best_for_evaluation(accelerator, output_dir, "full")
    from_best = evaluate(best_model, *args, log_mel=log_mel)
    if accelerator.is_main_process:
        best, _ = load_for_inference(f"{output_dir}/best")
        saved = best.state_dict()
        same_weights = all(torch.equal(saved[name].float(), original[name].float()) for name in original)
        results = {
            "units": len(fsdp2_units(model)),
            "plain": plain.predictions, "sharded": sharded.predictions,
            "plain_loss": plain.metrics["loss"], "sharded_loss": sharded.metrics["loss"],
            "resharded_after_eval": resharded, "whole_inside": whole, "best_equals_weights": same_weights,
            "after_step_utterances": after_step.metrics["num_utterances"],
            "best_predictions": from_best.predictions, "best_failed": from_best.metrics["num_failed"],
            "plain_bytes": plain_bytes, "sharded_bytes": sharded_bytes,
            "plain_timestamps": plain_timestamps, "sharded_timestamps": sharded_timestamps,
            "architectures": json.loads(Path(output_dir, "best", "config.json").read_text())["architectures"],
        }
        Path(output_dir, "fsdp_results.json").write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:5])
