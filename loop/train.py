"""The fine-tuning loop: `setup()` -> `fit()` -> `finish()`, driven by `accelerate.Accelerator`.

Accelerate owns device placement, mixed precision, gradient accumulation, the processes and checkpoint files;
everything else is here, in the order it happens. Read `fit()` top to bottom: each iteration evaluates and saves
at the top (so the last step reuses the same code), then takes one optimizer step, then logs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loop.config import RunConfig, to_dict
from loop.config.loading import config_warnings
from loop.data.augment import Augmenter, step_generator
from loop.data.loaders import eval_dataloader, train_dataloader
from loop.data.no_speech import allow_empty_transcripts
from loop.data.splits import PreparedData, build_datasets
from loop.data.streaming import StreamLoader, merged_skips, stream_loader
from loop.eval.evaluation import EvalResult, evaluate
from loop.eval.guard_sets import (
    PreparedGuardSet,
    attach_loaders,
    build_guard_sets,
    evaluate_guard_sets,
    guard_figures,
)
from loop.eval.timestamps import evaluate_timestamps_in_step, timestamp_scalars
from loop.files import write_json_atomic, write_text_atomic
from loop.model.distillation import Distillation, build_distillation, training_token_losses
from loop.model.encoder_window import batch_features, compile_encoder
from loop.model.features import LogMel
from loop.model.loading import load_model
from loop.model.lora import trainable_summary
from loop.model.loss import IGNORE_INDEX
from loop.model.sharding import check_generation_supported, grad_norm_tensor
from loop.optimizers import build_optimizer, get_lr_scheduler
from loop.results import build_results, write_results
from loop.run.accelerator import build_accelerator, resolve_mixed_precision
from loop.run.batch_size import Device, choose_batch_size
from loop.run.best_model import best_dir, load_best_for_evaluation, write_best_model
from loop.run.checkpoints import LoopState, keep_adapters_only, load_checkpoint, save_checkpoint
from loop.run.determinism import make_deterministic
from loop.run.disk_space import warn_if_short_of_space
from loop.run.ema import EMA, build_ema, ema_weights, update_ema
from loop.run.lock import release
from loop.run.output_dir import prepare_output_dir
from loop.run.precision import apply_update
from loop.run.stopping import StopRequested, agreed_stop
from loop.run.trackers import build_trackers, report_results, start_trackers
from loop.ship.model_card import push_to_hub, write_model_card
from loop.train_log import Interval, StepFigures, WaitClock, log_evaluation, log_guard_sets, log_training


@dataclass
class Run:
    """What `setup()` builds and `fit()` and `finish()` use."""

    config: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    selection_loader: DataLoader
    test_loader: DataLoader
    data: PreparedData
    state: LoopState
    log_mel: LogMel
    """The model's log-mel features, computed per batch on the accelerator."""
    augmenter: Augmenter
    """Speed, noise and gain on the training audio (`augment.*`), seeded per step; off by default."""
    guards: list[PreparedGuardSet]
    """`eval.guard_sets`, prepared, each with its evaluation DataLoader."""
    ema: EMA | None = None
    """`train.ema_decay`'s average of the weights, used for evaluation and `best/` (None: off)."""
    distillation: Distillation | None = None
    """`train.distill_from`'s frozen teacher and the loss weights (loop/model/distillation.py); None: labels only."""


def train(config: RunConfig, trackers: tuple = (), device: Device | None = None) -> dict:
    """Runs the whole job and returns the contents of results.json. `trackers`: Accelerate tracker objects that get
    everything the config's trackers get (a sweep's pruning: `loop.sweeps`). `device`: where a batch of `auto` is
    searched (a CUDA GPU unless a test passes a stand-in: `loop.run.batch_size`)."""
    try:
        config = choose_batch_size(config, setup, optimizer_step, device)  # `auto`: found on the accelerator first
        run = setup(config, trackers)
        stop = StopRequested()
        stop.install()
        stopped = fit(run, stop)
        if stopped:
            return {"stopped": stopped, "step": run.state.step}
        return finish(run)
    finally:
        release(config.output_dir)  # the folder's lock (a process that dies drops it anyway)


def setup(config: RunConfig, trackers: tuple = ()) -> Run:
    deterministic = make_deterministic() if config.train.deterministic else ""  # before anything touches CUDA
    accelerator = build_accelerator(
        resolve_mixed_precision(config.train.mixed_precision, "train.mixed_precision"),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=build_trackers(config, trackers),
        project_dir=config.output_dir,
        timeout_minutes=config.train.ddp_timeout_minutes,
    )
    set_seed(config.train.seed)
    if deterministic:
        accelerator.print(deterministic)
    for warning in config_warnings(config):
        accelerator.print(f"warning: {warning}")
    checkpoint = prepare_output_dir(config, accelerator)  # locks the folder; the verified checkpoint to resume
    model, processor = load_model(config.model, config.eval)
    distillation = build_distillation(config, model, processor, accelerator)  # a teacher that cannot teach stops us here
    if config.data.no_speech_fraction > 0:  # the empty transcript these rows teach must be one generation can give
        allow_empty_transcripts(model.generation_config)
    augmenter = Augmenter(config.augment, processor.feature_extractor.n_samples)  # a bad noise_dir stops us here
    accelerator.print(augmenter.describe())
    with accelerator.main_process_first():  # the main process fills the data cache, the others read it
        data = build_datasets(config, processor, model.config.max_target_positions)
        guards = build_guard_sets(config, processor, model.config.max_target_positions)
    if accelerator.is_main_process:
        data.write_report(config.output_dir)
    train_loader, selection_loader, test_loader = get_dataloaders(config, data, model, accelerator)
    attach_loaders(guards, config, model.config.decoder_start_token_id, accelerator)
    optimizer = build_optimizer(model, config.train)
    scheduler = get_lr_scheduler(optimizer, config.train.warmup_steps, config.train.max_steps)
    model, optimizer, scheduler, train_loader, selection_loader, test_loader = accelerator.prepare(
        model, optimizer, scheduler, train_loader, selection_loader, test_loader
    )
    if config.train.torch_compile:
        compile_encoder(accelerator.unwrap_model(model))  # in place, after wrapping
    check_generation_supported(accelerator, model)
    state = LoopState()
    ema = build_ema(accelerator, model, config.train)  # before the checkpoint is loaded: its hook restores the average
    if config.model.lora:  # checkpoints then hold the adapter, not the frozen base
        keep_adapters_only(accelerator)
        accelerator.print(trainable_summary(model))
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if isinstance(train_loader, StreamLoader):  # each process goes on from its own place in the shards
            train_loader.load_state_dict(state.streams)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif config.train.resume:
        accelerator.print(f"no checkpoint in {config.output_dir}/checkpoints: starting from step 0")
    start_trackers(accelerator, config)
    if accelerator.is_main_process:
        warn_if_short_of_space(accelerator, model, optimizer, config.output_dir, config.train.save_total_limit)
        write_json_atomic(Path(config.output_dir) / "config.json", to_dict(config))
        accelerator.print(data.reports["train"].summary())
        for part in data.train_parts[1:]:  # the data.mix sources, each with its own report
            accelerator.print(data.reports[part.name].summary() + f"  [{part.share:.0%} of each epoch's rows]")
        accelerator.print(data.reports["selection"].summary() + f"  [{data.selection_split}]")
        for prepared in guards:
            accelerator.print(prepared.report.summary() + f"  [guard set {prepared.guard.name}]")
    log_mel = LogMel(processor.feature_extractor).to(accelerator.device)
    return Run(config, accelerator, model, processor, optimizer, scheduler, train_loader, selection_loader,
               test_loader, data, state, log_mel, augmenter, guards, ema, distillation)


def get_dataloaders(config: RunConfig, data: PreparedData, model, accelerator=None) -> tuple:
    """Train (seeded shuffle), selection and test (longest first) loaders over the prepared tables; with
    `data.streaming`, the training rows are streamed from the shards (a `StreamLoader`, which splits them over the
    processes itself and is not given to `accelerator.prepare`)."""
    start, workers = model.config.decoder_start_token_id, config.train.dataloader_num_workers
    eval_batch = config.eval.per_device_eval_batch_size
    return (
        stream_loader(config, data.stream, start, accelerator) if data.stream else
        train_dataloader(data.train, config.train.per_device_train_batch_size, config.train.seed, start, workers,
                         group_by_length=config.train.group_by_length, parts=data.train_parts),
        eval_dataloader(data.selection, eval_batch, start, workers),
        eval_dataloader(data.test, eval_batch, start, workers),
    )


def fit(run: Run, stop: StopRequested | None = None) -> str:
    """Trains to `max_steps`; returns "" when done, or the name of the signal that stopped it (after saving)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    t, e = config.train, config.eval
    batches = WaitClock(endless_batches(run))
    resumed_at = state.step if state.step > 0 else None
    progress = tqdm(total=t.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    interval = Interval()
    while True:
        last_step = state.step == t.max_steps
        fresh = state.step != resumed_at  # a resumed step was already evaluated and saved before the stop
        if fresh and (last_step or (state.step % e.eval_steps == 0 and (state.step > 0 or e.eval_on_start))):
            with ema_weights(run.ema, run.model):
                run_selection_eval(run)
        if fresh and state.step > 0 and (last_step or state.step % t.save_steps == 0):
            save(run)
        if last_step:
            break
        if stop is not None and agreed_stop(accelerator, stop, state.step):
            return stop_and_save(run, stop.signal_name or "SIGTERM", resumed_at)
        if state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
            save(run)
            raise FloatingPointError(
                f"{state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                f"(step {state.step}); saved a checkpoint. Lower train.learning_rate or use bf16 instead of fp16."
            )
        started, waited = time.perf_counter(), batches.seconds
        try:
            figures = optimizer_step(run, batches)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(out_of_memory_advice(config)) from error
        update_ema(run.ema, run.model)
        state.step += 1
        interval.add(figures, seconds=time.perf_counter() - started, data_wait=batches.seconds - waited)
        progress.update(1)
        if state.step % t.logging_steps == 0 or state.step == t.max_steps:
            log_training(accelerator, state, interval, figures.grad_norm, run.scheduler, t.max_steps, progress)
            interval = Interval()
    progress.close()
    return ""


def save(run: Run) -> None:
    """A checkpoint of the run now; with streamed shards, with every process's place in them and the rows each
    skipped (merged into data_report.json)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    if isinstance(run.train_loader, StreamLoader):
        state.streams = gather_object([run.train_loader.state_dict()])
        run.data.stream_skips = merged_skips(state.streams)
        if accelerator.is_main_process:
            run.data.write_report(config.output_dir)
    save_checkpoint(accelerator, config.output_dir, state, to_dict(config), keep=config.train.save_total_limit)


def out_of_memory_advice(config: RunConfig) -> str:
    t = config.train
    return (
        f"CUDA out of memory at per_device_train_batch_size={t.per_device_train_batch_size}, "
        f"gradient_accumulation_steps={t.gradient_accumulation_steps}. Halve the batch and double the accumulation "
        f"(--train.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
        f"--train.gradient_accumulation_steps={t.gradient_accumulation_steps * 2}): the effective batch stays the "
        "same. --model.gradient_checkpointing=true saves more memory at about 30% more time."
    )


def endless_batches(run: Run):
    """Yields training micro-batches across epochs, keeping `state.epoch` and `state.batches_in_epoch` current;
    on resume it starts at the exact batch: same seeded order for the epoch, the consumed batches skipped."""
    state, loader = run.state, run.train_loader
    if isinstance(loader, StreamLoader):  # streamed shards: the loader keeps its own place (loop/data/streaming.py)
        for batch in loader:
            state.epoch = loader.position.epoch
            yield batch
    while True:
        loader.set_epoch(state.epoch)
        skipped = run.accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in skipped:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def optimizer_step(run: Run, batches) -> StepFigures:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    The loss is the mean over all target tokens of the whole step (every micro-batch, every process), so
    batch 8 x 1 and batch 4 x 2 give the same update although their micro-batches hold different token counts.
    Returns this process's figures of the step; their tensors stay on the device so logging can sync only every
    `logging_steps`.
    """
    accelerator, model, t = run.accelerator, run.model, run.config.train
    micro_batches = [next(batches) for _ in range(t.gradient_accumulation_steps)]
    local_tokens = sum(batch["labels"].ne(IGNORE_INDEX).sum() for batch in micro_batches)
    step_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum").clamp(min=1)
    # backward() divides by the accumulation steps and DDP averages over processes; undo both so the gradient
    # is exactly d(sum of token losses / step_tokens).
    scale = accelerator.num_processes * t.gradient_accumulation_steps / step_tokens
    loss_sum = torch.zeros((), device=accelerator.device)
    for number, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):
            audio = batch["audio"]
            if run.augmenter.enabled:  # its draws depend on the step, so a resumed run augments as it did
                generator = step_generator(t.seed, run.state.step, number, accelerator.process_index, audio.device)
                audio, _ = run.augmenter(audio, batch["audio_lengths"], generator)
            # Log-mel on the accelerator, at the model's window (full, or cut to the batch's longest clip).
            batch["input_features"] = batch_features(model, run.log_mel, audio)
            token_loss_sum = training_token_losses(model, batch, run.distillation).sum()
            accelerator.backward(token_loss_sum * scale)
            loss_sum += token_loss_sum.detach().float()
    # sync_gradients is now True: the last micro-batch all-reduced the gradients.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
    grad_norm = grad_norm_tensor(grad_norm, accelerator.device)  # DeepSpeed hands back a float
    if apply_update(accelerator, run.optimizer, run.scheduler, loss_sum, grad_norm):  # fp16: the scaler decides
        run.state.consecutive_nonfinite = 0
    else:
        run.state.nonfinite_steps += 1
        run.state.consecutive_nonfinite += 1
        accelerator.print(f"step {run.state.step + 1}: non-finite loss or gradient, update skipped")
    run.optimizer.zero_grad(set_to_none=True)
    return StepFigures(
        loss_sum=loss_sum,
        tokens=local_tokens,
        grad_norm=grad_norm,
        samples=sum(len(batch["index"]) for batch in micro_batches),
        # On the device: float() here would sync. A packed row holds several utterances.
        utterances=sum(batch["utterances"].sum() for batch in micro_batches),
        audio_seconds=sum(batch["durations"].sum() for batch in micro_batches),
    )


def run_selection_eval(run: Run) -> EvalResult:
    """Evaluates on the selection split and the guard sets, logs them, and writes `best/` when the selection WER
    is the best so far (guard sets never choose the model)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    references = run.data.selection["text"]
    result = evaluate(run.model, run.selection_loader, accelerator, run.processor.tokenizer, references,
                      config.model.language, log_mel=run.log_mel, description=f"eval step {state.step}")
    wer = result.metrics["wer"]
    if state.step == 0:
        state.initial_wer = wer
    improved = wer < state.best_wer
    if improved:
        state.best_wer, state.best_step = wer, state.step
        write_best_model(accelerator, run.model, run.processor, config.output_dir)
    guard_results = evaluate_guard_sets(run.model, run.guards, accelerator, run.processor.tokenizer,
                                        log_mel=run.log_mel, step=state.step)
    state.evaluations.append({"step": state.step, **result.metrics, "seconds": result.seconds,
                              "guards": {name: guard_figures(guard.metrics) for name, guard in guard_results.items()}})
    log_evaluation(accelerator, state.step, result, improved, run.data.selection_split, config)
    log_guard_sets(accelerator, state, guard_results, config.eval.language_id_drop_warning)
    if config.data.timestamp_fraction > 0:  # timestamps too, when training keeps them (every process: sharding)
        scores = evaluate_timestamps_in_step(accelerator, run.model, run.processor.tokenizer, run.data.selection,
                                             run.log_mel, batch_size=config.eval.per_device_eval_batch_size,
                                             language=config.model.language)
        accelerator.log(timestamp_scalars(scores), step=state.step)
    if accelerator.is_main_process:  # the latest hypotheses, for a look at what the model says now
        ids = run.data.selection["id"]
        lines = [json.dumps({"step": state.step, "id": ids[p["index"]], **p}, ensure_ascii=False) + "\n"
                 for p in result.predictions]
        write_text_atomic(Path(config.output_dir) / "eval_predictions.jsonl", "".join(lines))
    return result


def stop_and_save(run: Run, signal_name: str, resumed_at: int | None) -> str:
    """After a SIGTERM/SIGINT: save at the current step boundary, say how to resume, and return."""
    config, accelerator, state = run.config, run.accelerator, run.state
    if state.step != resumed_at:
        save(run)
    accelerator.print(
        f"{signal_name} received: saved step {state.step} in {config.output_dir}/checkpoints. "
        f"Resume with the same command plus --train.resume=true"
    )
    accelerator.end_training()
    return signal_name


def finish(run: Run) -> dict:
    """Evaluates the best model on the held-out split and writes results.json: at the window it trained with and,
    for a dynamic window, at the full 30-s window too (other tools, the Hub pipeline and faster-whisper, always
    pad to it)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    best_folder = best_dir(config.output_dir)
    by_window = {}
    for window in dict.fromkeys([config.model.encoder_window, "full"]):
        best = load_best_for_evaluation(accelerator, config.output_dir, window, config.model.attn_implementation)
        by_window[window] = evaluate(best, run.test_loader, accelerator, run.processor.tokenizer,
                                     run.data.test["text"], config.model.language, log_mel=run.log_mel,
                                     description=f"test ({window} window)").metrics
    test = by_window[config.model.encoder_window]
    accelerator.log({f"test/{k}": test[k] for k in ("wer", "cer", "normalized_wer", "normalized_cer")}, step=state.step)
    results = build_results(config, state, test, selection_split=run.data.selection_split,
                            data_report=run.data.report_dict(), num_processes=accelerator.num_processes,
                            mixed_precision=accelerator.mixed_precision, test_by_window=by_window)
    if accelerator.is_main_process:
        write_results(config.output_dir, results)
        write_model_card(best_folder, results, config)
        if config.train.push_to_hub:  # the token comes from `hf auth login` or HF_TOKEN, never from the config
            uploaded = push_to_hub(best_folder, config.train.hub_model_id)
            accelerator.print(f"pushed {len(uploaded)} files of {best_folder} to {config.train.hub_model_id}")
        accelerator.print(
            f"done: selection WER {state.initial_wer} -> best {state.best_wer:.2f} at step {state.best_step}; "
            f"{config.data.eval_split} WER of best/ "
            + ", ".join(f"{metrics['wer']:.2f} ({window} window)" for window, metrics in by_window.items())
            + ("  [recipe mode: the test split also chose the model]" if config.eval.select_on == "test" else "")
            + "".join(f"; guard {name} WER {g['initial']['wer']:.2f} at step {g['initial_step']} -> "
                      f"{g['best']['wer']:.2f} at the best step" for name, g in results["guard_sets"].items())
        )
    report_results(accelerator, results)
    accelerator.end_training()
    return results
