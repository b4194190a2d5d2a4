"""The training loop, in-process on a small Whisper: learning, accumulation, resume, rotation, results."""

from __future__ import annotations

import json
import math
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.loaders import Rows
from loop.data.sources import write_manifest
from loop.optimizers import get_lr_scheduler
from loop.run.checkpoints import LoopState, list_checkpoints, rotate_checkpoints
from loop.train import finish, fit, optimizer_step, run_selection_eval, setup, train
from tests.helpers import (
    PROJECT,
    StopAt,
    child_env,
    corpus_rows,
    reset_accelerate,
    run_config,
    script_command,
    tensorboard_scalars,
)


def small_run(tmp_path, fast_model, cache_dir, *overrides, name="run"):
    return run_config(
        tmp_path / name, fast_model, cache_dir,
        "--data.max_train_samples=48", "--data.selection_size=12", "--data.max_eval_samples=8",
        "--train.per_device_train_batch_size=8", "--train.learning_rate=3e-3", "--train.report_to=tensorboard",
        "--eval.per_device_eval_batch_size=16", "--eval.generation_max_length=48", *overrides,
    )


def memorising_run(tmp_path, fast_model, cache_dir, utterances, *overrides):
    """(rows, config) of a run that trains on the first `utterances` training rows, written as a manifest, and
    selects and tests on the same rows (so the results say the test split chose the model): no dropout, no
    SpecAugment, TensorBoard on, output in `<tmp_path>/out`."""
    rows = corpus_rows("train")[:utterances]
    write_manifest(tmp_path / "m" / "train.csv", rows)
    config = run_config(
        tmp_path / "out", fast_model, cache_dir,
        "--data.source=manifest", f"--data.path={tmp_path / 'm'}", "--data.train_splits=train",
        "--data.eval_split=train", "--eval.select_on=test", "--train.learning_rate=3e-3",
        "--train.report_to=tensorboard", "--model.dropout=0", "--model.apply_spec_augment=false", *overrides,
    )
    return rows, config


def test_overfits_eight_utterances(tmp_path, fast_model, session_cache_dir):
    """Loss falls tenfold and the model transcribes its 8 training utterances with WER <= 10%."""
    rows, config = memorising_run(
        tmp_path, fast_model, session_cache_dir, 8, "--train.per_device_train_batch_size=8",
        "--train.warmup_steps=10", "--train.max_steps=160", "--eval.eval_steps=160", "--train.save_steps=160",
        "--eval.generation_max_length=64",
    )
    results = train(config)
    losses = tensorboard_scalars(tmp_path / "out", "train/loss")
    assert losses[160] < losses[1] / 10, (losses[1], losses[160])
    assert results["best_wer"] <= 10.0, results
    assert results["selection_leaks_test"] is True
    waits = tensorboard_scalars(tmp_path / "out", "train/data_wait_fraction")
    assert waits.keys() == losses.keys() and all(0 <= w < 1 for w in waits.values())
    # every step holds all 8 utterances: audio seconds per sample is their mean duration
    from loop.data.audio import SAMPLE_RATE, decode_audio

    mean_duration = sum(len(decode_audio(row["audio_path"])) for row in rows) / SAMPLE_RATE / len(rows)
    audio_rate = tensorboard_scalars(tmp_path / "out", "train/audio_seconds_per_second")[160]
    sample_rate = tensorboard_scalars(tmp_path / "out", "train/samples_per_second")[160]
    assert audio_rate / sample_rate == pytest.approx(mean_duration, rel=1e-4)


def test_packed_rows_train_and_count_their_utterances(tmp_path, fast_model, session_cache_dir):
    """With data.pack_to_seconds, 16 utterances train as fewer rows; every step (one batch of all rows) counts
    16 utterances, the loss falls, and the unpacked utterances are decoded one by one at the end."""
    _, config = memorising_run(
        tmp_path, fast_model, session_cache_dir, 16, "--data.pack_to_seconds=5",
        "--train.per_device_train_batch_size=64", "--train.warmup_steps=5", "--train.max_steps=40",
        "--eval.eval_steps=40", "--train.save_steps=40", "--eval.generation_max_length=24",
    )
    results = train(config)
    packing = results["data"]["train"]
    assert packing["kept"] == 16 and 8 <= packing["windows"] < 16
    utterance_rates = tensorboard_scalars(tmp_path / "out", "train/utterances_per_second")
    sample_rates = tensorboard_scalars(tmp_path / "out", "train/samples_per_second")
    assert utterance_rates.keys() == sample_rates.keys() and len(utterance_rates) == 40
    for step, rate in utterance_rates.items():
        assert rate / sample_rates[step] == pytest.approx(16 / packing["windows"], rel=1e-4), step
    assert results["train_utterances_per_second"] / results["train_samples_per_second"] == pytest.approx(
        16 / packing["windows"], rel=1e-4)
    losses = tensorboard_scalars(tmp_path / "out", "train/loss")
    assert losses[40] < losses[1] / 2, (losses[1], losses[40])
    assert results["test_utterances"] == 16  # evaluation rows are never packed


def test_the_wait_for_data_is_measured(monkeypatch):
    """WaitClock counts the time spent in next() and nothing else (on a fake clock, so the test cannot be slow:
    the standard library's, since WaitClock reads time.perf_counter and takes no clock)."""
    from loop.train import WaitClock

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def slow_batches():
        for number in range(3):
            now[0] += 0.05  # loading this batch
            yield number

    clock = WaitClock(slow_batches())
    for expected in range(3):
        assert next(clock) == expected
        now[0] += 0.2  # the step's compute: not waiting
    assert clock.seconds == pytest.approx(0.15)
    with pytest.raises(StopIteration):
        next(clock)


def test_dropout_and_spec_augment_are_live_in_training_steps(tmp_path, fast_model, session_cache_dir):
    """`from_pretrained` hands models back in eval mode; the loop must train in training mode, before and after
    an evaluation, so dropout and SpecAugment act when asked for: the same batch then gives two different losses."""
    from loop.model.loss import token_losses

    run = setup(small_run(tmp_path, fast_model, session_cache_dir, "--model.dropout=0.1", "--train.max_steps=1",
                          "--train.report_to=none"))
    batch = next(iter(run.train_loader))
    batch["input_features"] = run.log_mel(batch["audio"])
    assert run.model.training
    with torch.no_grad():
        assert not torch.equal(token_losses(run.model, batch), token_losses(run.model, batch))
    run_selection_eval(run)
    assert run.model.training


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, fast_model, session_cache_dir):
    """One optimizer step of batch 8 x 1 and of batch 4 x 2 over the same 8 utterances sees the same loss and the
    same gradient (so any optimizer makes the same update), although the two micro-batches hold different
    numbers of target tokens. (No dropout, no SpecAugment: their random masks would differ between the two.)"""
    seen = {}
    for batch_size, accumulation in ((8, 1), (4, 2)):
        config = small_run(tmp_path, fast_model, session_cache_dir, f"--train.per_device_train_batch_size={batch_size}",
                           f"--train.gradient_accumulation_steps={accumulation}", "--train.max_steps=1",
                           "--eval.eval_steps=1", "--train.report_to=none", "--model.dropout=0",
                           "--model.apply_spec_augment=false", name=f"acc{accumulation}")
        run = setup(config)
        rows = Rows(run.data.train)
        collate = SpeechSeq2SeqCollator(run.model.config.decoder_start_token_id)
        micro_batches = [collate([rows[i] for i in range(start, start + batch_size)]) for start in range(0, 8, batch_size)]
        if accumulation == 2:
            tokens = [int(b["labels"].ne(-100).sum()) for b in micro_batches]
            assert tokens[0] != tokens[1]
        step = run.optimizer.step
        gradients = {}

        def record_then_step(*args, **kwargs):
            gradients.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)

        run.optimizer.step = record_then_step
        figures = optimizer_step(run, iter(micro_batches))
        seen[accumulation] = (gradients, figures.loss_sum.item(), int(figures.tokens), figures.grad_norm.item(),
                              figures.samples)
        reset_accelerate()
    (one, loss_one, tokens_one, norm_one, samples_one), (two, loss_two, tokens_two, norm_two, samples_two) = seen[1], seen[2]
    assert len(one) == len(two) > 50
    for name, gradient in one.items():
        torch.testing.assert_close(two[name], gradient, rtol=1e-4, atol=1e-8, msg=name)
    assert loss_two == pytest.approx(loss_one, rel=1e-5) and tokens_one == tokens_two and samples_one == samples_two == 8
    assert norm_two == pytest.approx(norm_one, rel=1e-5) and norm_one > 0


AUGMENTED_DYNAMIC = ("--augment.speed_perturbation=true", "--augment.noise_probability=0.5",
                     "--augment.gain_probability=0.5", "--model.encoder_window=dynamic", "--train.group_by_length=true",
                     "--model.dropout=0.1", "--model.apply_spec_augment=true", "--model.mask_feature_prob=0.05",
                     "--data.timestamp_fraction=0.5")


@pytest.mark.parametrize(("fast_model", "extra"), [("v2", ()), ("v3", ()), ("v2", AUGMENTED_DYNAMIC)],
                         ids=["plain", "plain-v3", "augmented-dynamic-grouped"], indirect=["fast_model"])
def test_resume_matches_an_uninterrupted_run(tmp_path, fast_model, session_cache_dir, extra):
    """2N steps straight == N steps, stop, resume, N steps: identical per-step losses and final weights; also
    with dropout, SpecAugment, augmentation drawn per step, the dynamic encoder window, length-grouped batches and
    half the rows timestamped (whose evaluation decodes with timestamps too), and on a v3-shaped model (128 mel
    bins, its own special ids)."""
    common = ("--train.max_steps=12", "--train.save_steps=3", "--eval.eval_steps=6", "--train.save_total_limit=2",
              *extra)
    straight = train(small_run(tmp_path, fast_model, session_cache_dir, *common, name="straight"))
    reset_accelerate()
    config = small_run(tmp_path, fast_model, session_cache_dir, *common, name="resumed")
    run = setup(config)
    assert fit(run, StopAt(run, 7)) == "SIGTERM"  # 48 rows / batch 8: step 7 is inside the second epoch
    assert [step for step, _ in list_checkpoints(config.output_dir)][-1] == 7
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 7 and run.state.epoch == 1 and run.state.batches_in_epoch == 1
    assert fit(run) == ""
    resumed = finish(run)

    losses_straight = tensorboard_scalars(tmp_path / "straight", "train/loss")
    losses_resumed = tensorboard_scalars(tmp_path / "resumed", "train/loss")
    assert sorted(losses_straight) == list(range(1, 13))
    assert losses_resumed == losses_straight  # bitwise: the same float32 values
    final_straight = load_file(str(tmp_path / "straight" / "checkpoints" / "step_12" / "model.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_12" / "model.safetensors"))
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)
    assert resumed["best_wer"] == straight["best_wer"] and resumed["test_wer"] == straight["test_wer"]
    kept = [step for step, _ in list_checkpoints(tmp_path / "resumed")]
    assert kept[-2:] == [9, 12] and len(kept) <= 3


def test_a_dynamic_window_trains_on_short_features_and_is_scored_at_both_windows(tmp_path, fast_model,
                                                                                 session_cache_dir):
    """`model.encoder_window=dynamic`: the encoder sees each batch cut to its longest clip rounded up to 1 s (never
    the full window: every shipped clip is under 4 s), the loss falls, best/ records the window (and loads as a
    stock Whisper), and the test split is scored at the dynamic and at the full window."""
    import json

    config = small_run(tmp_path, fast_model, session_cache_dir, "--model.encoder_window=dynamic",
                       "--train.group_by_length=true", "--train.max_steps=30", "--eval.eval_steps=30",
                       "--train.save_steps=30", "--train.report_to=tensorboard")
    run = setup(config)
    frames = []
    run.model.get_encoder().register_forward_pre_hook(lambda module, args: frames.append(args[0].shape[-1]))
    assert fit(run) == ""
    results = finish(run)
    window = run.log_mel.window_frames  # 500 frames: the fast model's 5-s window
    assert frames and set(frames) <= {100, 200, 300, 400} and min(frames) < window
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    assert losses[30] < losses[1] * 0.8
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert (saved["encoder_window"], saved["encoder_window_multiple_s"]) == ("dynamic", 1.0)
    assert results["encoder_window"] == "dynamic" and set(results["test_by_window"]) == {"dynamic", "full"}
    assert results["test_wer"] == results["test_by_window"]["dynamic"]["wer"]


def test_results_json_and_outputs(tmp_path, fast_model, session_cache_dir):
    config = small_run(tmp_path, fast_model, session_cache_dir, "--train.max_steps=4", "--eval.eval_steps=2",
                       "--train.save_steps=2", "--eval.eval_on_start=true", "--train.save_total_limit=1")
    results = train(config)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("initial_wer", "best_wer", "best_step", "final_wer", "test_wer", "selection_split", "steps",
                "train_samples_per_second", "effective_batch_size", "seed", "versions"):
        assert saved[key] is not None, key
    assert saved["steps"] == 4 and saved["effective_batch_size"] == 8 and saved["seed"] == 42
    assert [e["step"] for e in saved["evaluations"]] == [0, 2, 4]
    assert saved["initial_wer"] == saved["evaluations"][0]["wer"]
    assert saved["final_wer"] == saved["evaluations"][-1]["wer"]
    assert saved["best_wer"] == min(e["wer"] for e in saved["evaluations"])
    assert saved["selection_split"].startswith("dev_slice") and saved["selection_leaks_test"] is False
    assert saved["versions"]["transformers"].startswith("5.")
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "tokenizer.json").is_file()
    assert json.loads((out / "best" / "generation_config.json").read_text())["language"] == "hi"
    card = (out / "best" / "README.md").read_text()
    assert card.startswith("---\n") and "automatic-speech-recognition" in card and "whisper" in card
    assert [step for step, _ in list_checkpoints(out)][-1] == 4
    assert len(list_checkpoints(out)) <= 2  # the limit, plus the best when it is older
    assert tensorboard_scalars(out, "eval/wer").keys() == {0, 2, 4}
    assert (out / "data_report.json").is_file() and (out / "config.json").is_file()


def test_bf16_autocast_trains_and_evaluates(tmp_path, fast_model, session_cache_dir):
    """bf16 (the H100 setting; autocast runs on a CPU too): the loss falls, evaluation decodes from the shared
    bf16 encoder pass, and the weights stay and are saved in float32."""
    from safetensors import safe_open

    config = small_run(tmp_path, fast_model, session_cache_dir, "--train.mixed_precision=bf16", "--train.max_steps=12",
                       "--train.warmup_steps=2", "--train.logging_steps=1", "--eval.eval_steps=12",
                       "--train.save_steps=12", "--eval.generation_max_length=16")
    run = setup(config)
    assert run.accelerator.mixed_precision == "bf16"
    assert fit(run) == ""
    results = finish(run)
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    assert all(math.isfinite(v) for v in losses.values()) and losses[12] < losses[1]
    last = results["evaluations"][-1]
    assert last["num_utterances"] == len(run.data.selection) > 0 and last["num_failed"] == 0 and math.isfinite(last["loss"])
    with safe_open(str(tmp_path / "run" / "best" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}


def test_refuses_an_output_dir_with_another_runs_checkpoints(tmp_path, fast_model, session_cache_dir):
    from loop.config import ConfigError

    config = small_run(tmp_path, fast_model, session_cache_dir, "--train.max_steps=1", "--eval.eval_steps=1",
                       "--train.report_to=none")
    train(config)
    reset_accelerate()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        setup(config)


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "loop_state.json").write_text(json.dumps(LoopState(step=step).to_json()))
    (tmp_path / "checkpoints" / "step_12").mkdir()  # no state file: an interrupted save, never a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step_12").mkdir()
    deleted = rotate_checkpoints(tmp_path, keep=2, protect_step=4)
    assert sorted(p.name for p in deleted) == ["step_2", "step_6"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 8, 10]
    assert not (tmp_path / "checkpoints" / ".tmp-step_12").exists()


def test_lr_schedule_warmup_then_linear_decay():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=4, max_steps=12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert math.isclose(scheduler.get_last_lr()[0], 0.0, abs_tol=1e-12)


def test_two_processes_match_one(tmp_path, fast_model, session_cache_dir):
    """accelerate launch with 2 CPU processes (gloo): every held-out utterance evaluated exactly once, one set of
    checkpoints, the same eval WER as one process with the same global batch, and the schedule over optimizer
    steps (not stepped once per process)."""
    common = ["--train.max_steps=6", "--eval.eval_steps=3", "--train.save_steps=3", "--train.warmup_steps=2",
              "--data.max_train_samples=48", "--data.selection_size=12", "--data.max_eval_samples=8",
              "--train.learning_rate=3e-3", "--eval.generation_max_length=48", "--eval.per_device_eval_batch_size=5",
              f"--model.name_or_path={fast_model}", f"--data.cache_dir={session_cache_dir}", "--train.logging_steps=1",
              "--model.dropout=0", "--model.apply_spec_augment=false"]  # no per-process randomness
    single = script_command("train", "--config", "quickstart", "--output_dir", tmp_path / "one",
                            "--train.per_device_train_batch_size=8", *common)
    double = script_command("train", "--config", "quickstart", "--output_dir", tmp_path / "two",
                            "--train.per_device_train_batch_size=4", *common, processes=2)
    for command in (single, double):
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=PROJECT)
        assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and two["effective_batch_size"] == one["effective_batch_size"] == 8
    selection_size = one["data"]["selection"]["kept"]
    predictions = [json.loads(line) for line in (tmp_path / "two" / "eval_predictions.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in predictions) == list(range(selection_size))  # each exactly once
    assert [e["num_utterances"] for e in two["evaluations"]] == [selection_size] * 3
    assert two["test_utterances"] == one["test_utterances"] == 8
    assert [e["wer"] for e in two["evaluations"]] == [e["wer"] for e in one["evaluations"]]
    assert [e["loss"] for e in two["evaluations"]] == pytest.approx([e["loss"] for e in one["evaluations"]], rel=1e-4)
    assert [step for step, _ in list_checkpoints(tmp_path / "two")] == [3, 6]
    rates = tensorboard_scalars(tmp_path / "two", "train/learning_rate")
    # learning rate after step s: warmup over 2 steps, then linear decay to 0 at step 6
    assert [rates[s] for s in range(1, 7)] == pytest.approx([1.5e-3, 3e-3, 2.25e-3, 1.5e-3, 7.5e-4, 0.0])


@pytest.mark.slow  # compiling takes a minute or more on 2 cores: run by hand with -m slow
def test_torch_compile_option_trains_saves_and_resumes(tmp_path, fast_model, session_cache_dir):
    """--train.torch_compile: the compiled model learns as the eager one does, its checkpoints and best/ hold the
    plain parameter names (loadable without compiling), and a compiled run resumes from them."""
    from safetensors import safe_open
    from transformers import WhisperForConditionalGeneration

    # No dropout or SpecAugment: compiled kernels draw their random masks differently from eager ones.
    common = ("--train.max_steps=6", "--train.save_steps=3", "--eval.eval_steps=6", "--eval.generation_max_length=16",
              "--model.dropout=0", "--model.apply_spec_augment=false")
    eager = train(small_run(tmp_path, fast_model, session_cache_dir, *common, name="eager"))
    reset_accelerate()
    config = small_run(tmp_path, fast_model, session_cache_dir, *common, "--train.torch_compile=true", name="compiled")
    run = setup(config)
    assert fit(run, StopAt(run, 3)) == "SIGTERM"
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 3
    assert fit(run) == ""
    compiled = finish(run)
    for folder in (tmp_path / "compiled" / "checkpoints" / "step_6", tmp_path / "compiled" / "best"):
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            assert not [k for k in weights.keys() if "_orig_mod" in k], folder
    WhisperForConditionalGeneration.from_pretrained(tmp_path / "compiled" / "best")
    eager_losses = tensorboard_scalars(tmp_path / "eager", "train/loss")
    compiled_losses = tensorboard_scalars(tmp_path / "compiled", "train/loss")
    assert compiled_losses.keys() == eager_losses.keys()
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-3), step
    assert compiled["steps"] == eager["steps"] == 6
