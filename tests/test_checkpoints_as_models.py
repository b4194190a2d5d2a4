"""Every checkpoint is a model (loop/run/model_folder.py, loop/eval/run_scores.py): `checkpoints/step_N` of a full
and a LoRA run decodes exactly as `best/` when it is the best step, a whole run gives a row per checkpoint, a
picture and TensorBoard points, a checkpoint saved by an earlier version (the run configuration as config.json)
still evaluates and resumes, the demo and the export take a step checkpoint, and a folder that is no model gets one
short line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop.config import ConfigError
from loop.eval.run_scores import SCORES_FILE, TENSORBOARD_TAG
from loop.model.encoder_window import saved_encoder_window
from loop.run.checkpoints import LEGACY_RUN_CONFIG_FILE, RUN_CONFIG_FILE, STATE_FILE, LoopState, write_state_file
from loop.run.model_folder import load_inference_model
from loop.train import train
from tests.helpers import (
    CORPUS,
    PROJECT,
    child_env,
    reset_accelerate,
    run_config,
    run_evaluate_script,
    script_command,
    tensorboard_scalars,
)
from tests.reference import read_predictions_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES = 8  # test-split utterances scored per model
RUN = ("--data.max_train_samples=16", "--data.selection_size=8", f"--data.max_eval_samples={SAMPLES}",
       "--train.per_device_train_batch_size=4", "--train.max_steps=4", "--train.save_steps=2", "--eval.eval_steps=2",
       "--train.report_to=tensorboard", "--eval.generation_max_length=20", "--model.dropout=0",
       "--model.apply_spec_augment=false")
# The LoRA run also trains with a dynamic encoder window, which its checkpoints must decode with as the loop did.
KINDS = {"full": ("--train.learning_rate=3e-4",),
         "lora": ("--model.lora=true", "--train.learning_rate=1e-2", "--model.encoder_window=dynamic")}


def make_run(folder: Path, base: Path, cache_dir: Path, kind: str, *extra: str):
    return run_config(folder, base, cache_dir, *RUN, *KINDS[kind], *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, decoding_checkpoint, session_cache_dir) -> dict[str, Path]:
    """A 4-step run of each kind from the decoding checkpoint (it says something different for every clip),
    step_2, step_4 and best/ saved."""
    made = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(f"run-{kind}") / "run"
        train(make_run(folder, decoding_checkpoint, session_cache_dir, kind))
        reset_accelerate()
        made[kind] = folder
    return made


@pytest.fixture(scope="module")
def scored(runs, tmp_path_factory) -> dict[str, Path]:
    """`scripts/evaluate.py --model RUN` on each run: its own test split, from its saved configuration."""
    outputs = {}
    for kind, run in runs.items():
        outputs[kind] = tmp_path_factory.mktemp(f"scores-{kind}")
        assert run_evaluate_script("--model", run, "--output_dir", outputs[kind]) == 0
    return outputs


def hypotheses(folder: Path) -> dict[int, str]:
    return {row["id"]: row["hypothesis"] for row in read_predictions_jsonl(folder / "predictions.jsonl")}


def test_checkpoints_keep_the_run_config_under_a_name_no_model_loader_reads(runs):
    for run in runs.values():
        for step in (2, 4):
            checkpoint = run / "checkpoints" / f"step_{step}"
            assert (checkpoint / RUN_CONFIG_FILE).is_file() and not (checkpoint / "config.json").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_best_step_decodes_exactly_as_best(kind, runs, scored):
    results = json.loads((runs[kind] / "results.json").read_text())
    best_step = results["best_step"]
    assert best_step in (2, 4)
    at_best = hypotheses(scored[kind] / f"step_{best_step}")
    assert len(at_best) == SAMPLES and any(at_best.values())
    assert at_best == hypotheses(scored[kind] / "best")
    # The same weights, bit for bit, as best/ holds them (a LoRA checkpoint merged as best/ merges it).
    model, _ = load_inference_model(runs[kind] / "checkpoints" / f"step_{best_step}")
    best, _ = load_inference_model(runs[kind] / "best")
    assert model.state_dict().keys() == best.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], best.state_dict()[k]) for k in best.state_dict())
    assert model.generation_config.to_diff_dict() == best.generation_config.to_diff_dict()
    assert saved_encoder_window(model) == saved_encoder_window(best) == (
        ("dynamic", 1.0) if kind == "lora" else ("full", 1.0))


def test_a_checkpoint_of_a_run_with_an_average_loads_the_average(tmp_path, decoding_checkpoint, session_cache_dir):
    """With train.ema_decay the loop evaluates and writes best/ with the averaged weights: the checkpoint of the
    same step loads them too (bit for bit best/'s), not the raw weights of its model.safetensors."""
    run = tmp_path / "run"
    train(make_run(run, decoding_checkpoint, session_cache_dir, "full", "--train.max_steps=2",
                   "--train.ema_decay=0.5", "--train.report_to=none"))
    reset_accelerate()
    model, _ = load_inference_model(run / "checkpoints" / "step_2")
    best, _ = load_inference_model(run / "best")
    assert all(torch.equal(model.state_dict()[k], best.state_dict()[k]) for k in best.state_dict())
    raw = load_file(str(run / "checkpoints" / "step_2" / "model.safetensors"))
    assert any(not torch.equal(raw[name], model.state_dict()[name]) for name in raw)


def test_a_full_checkpoint_holds_its_own_weights_not_the_base(runs, decoding_checkpoint):
    checkpoint = runs["full"] / "checkpoints" / "step_4"
    model, _ = load_inference_model(checkpoint)
    saved = load_file(str(checkpoint / "model.safetensors"))
    base = load_file(str(decoding_checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert any(not torch.equal(saved[name], base[name]) for name in saved)


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_folder_gives_a_row_per_checkpoint_a_picture_and_tensorboard_points(kind, runs, scored):
    out, run = scored[kind], runs[kind]
    result = json.loads((out / f"{SCORES_FILE}.json").read_text())
    assert [(row["model"], row["step"]) for row in result["rows"]][:2] == [("step_2", 2), ("step_4", 4)]
    assert result["rows"][2]["model"] == "best" and result["num_utterances"] == SAMPLES
    for row in result["rows"]:  # each row is the metrics.json of that model's own evaluation
        metrics = json.loads((out / row["model"] / "metrics.json").read_text())
        assert row["wer"] == metrics["wer"] and row["language_id"] == metrics["language_id"]
    assert [entry["step"] for entry in result["selection"]] == [2, 4]  # the loop's selection WER, from results.json
    table = (out / f"{SCORES_FILE}.md").read_text().splitlines()
    assert sum(line.startswith(("| step_", "| best ")) for line in table) == 3
    assert (out / f"{SCORES_FILE}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = tensorboard_scalars(run / "tensorboard", f"{TENSORBOARD_TAG}/test/wer")
    assert logged == pytest.approx({row["step"]: row["wer"] for row in result["rows"][:2]})


def test_two_processes_score_a_run_as_one_does(runs, scored, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) splits each model's utterances: the same table. (The full
    window: with a dynamic one, each batch's window follows its longest clip, so other batches decode otherwise.)"""
    command = script_command("evaluate", "--model", runs["full"], "--output_dir", tmp_path / "two", "--batch_size=3",
                             processes=2)
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((scored["full"] / f"{SCORES_FILE}.json").read_text())
    two = json.loads((tmp_path / "two" / f"{SCORES_FILE}.json").read_text())
    assert two["rows"] == one["rows"]
    assert json.loads((tmp_path / "two" / "best" / "metrics.json").read_text())["num_processes"] == 2


def test_compare_and_guard_sets_take_checkpoints(runs, tmp_path):
    """--compare takes a step checkpoint (here against best/, the same model at the best step: the same figures);
    a run scored with --guard_sets gets each guard set's WER per model, in the JSON and the table."""
    run = runs["full"]
    best_step = json.loads((run / "results.json").read_text())["best_step"]
    assert run_evaluate_script("--model", run / "best", "--compare", run / "checkpoints" / f"step_{best_step}",
                               f"--data.max_eval_samples={SAMPLES}", f"--data.path={CORPUS}",
                               "--output_dir", tmp_path / "compare") == 0
    metrics = json.loads((tmp_path / "compare" / "metrics.json").read_text())
    assert metrics["compare"]["model"].endswith(f"step_{best_step}")
    assert (metrics["compare"]["wer"], metrics["compare"]["cer"]) == (metrics["wer"], metrics["cer"])
    english = f"{{name: english, language: english, path: {CORPUS}, locale: en, max_samples: 4}}"
    assert run_evaluate_script("--model", run, "--guard_sets", f"--eval.guard_sets=[{english}]",
                               "--output_dir", tmp_path / "guards") == 0
    result = json.loads((tmp_path / "guards" / f"{SCORES_FILE}.json").read_text())
    assert all(0 <= row["guards"]["english"]["wer"] for row in result["rows"]) and len(result["rows"]) == 3
    assert "english WER" in (tmp_path / "guards" / f"{SCORES_FILE}.md").read_text()


def test_a_checkpoint_that_fails_verification_is_skipped_with_the_reason(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    weights = run / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    assert run_evaluate_script("--model", run, "--output_dir", tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / f"{SCORES_FILE}.json").read_text())
    assert [row["model"] for row in result["rows"]] == ["step_4", "best"]
    (skipped,) = result["skipped"]
    assert skipped["model"] == "step_2" and "model.safetensors" in skipped["reason"]
    assert "skipped step_2: model.safetensors" in (tmp_path / "out" / f"{SCORES_FILE}.md").read_text()


def to_old_layout(run: Path) -> None:
    """What earlier versions wrote: the run configuration as the checkpoint's config.json, in its checksums."""
    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / RUN_CONFIG_FILE).rename(checkpoint / LEGACY_RUN_CONFIG_FILE)
        state = json.loads((checkpoint / STATE_FILE).read_text())
        write_state_file(checkpoint, LoopState.from_json(state))


def test_an_old_layout_checkpoint_still_evaluates_and_resumes(runs, scored, tmp_path, decoding_checkpoint,
                                                              session_cache_dir):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    to_old_layout(run)
    old = run / "checkpoints" / "step_4"
    assert json.loads((old / "config.json").read_text())["model"]["name_or_path"] == str(decoding_checkpoint)
    assert run_evaluate_script("--model", old, "--output_dir", tmp_path / "eval") == 0
    assert hypotheses(tmp_path / "eval") == hypotheses(scored["full"] / "step_4")
    # A resume reads the old config.json: a changed seed is refused as it is for a new checkpoint...
    with pytest.raises(ConfigError, match="train.seed was 42"):
        train(make_run(run, decoding_checkpoint, session_cache_dir, "full", "--train.resume=true", "--train.seed=7"))
    reset_accelerate()
    # ...and the run goes on from step 4, its new checkpoint in the new layout.
    results = train(make_run(run, decoding_checkpoint, session_cache_dir, "full", "--train.resume=true",
                             "--train.max_steps=6"))
    assert results["steps"] == 6
    assert (run / "checkpoints" / "step_6" / RUN_CONFIG_FILE).is_file()
    assert not (run / "checkpoints" / "step_6" / "config.json").exists()


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


WRONG = {
    "run without checkpoints": "is a run folder without checkpoints or best/",
    "tensorboard": "holds TensorBoard logs, not a model",
    "checkpoints folder": "holds a run's checkpoints (step_2, step_4), not one model",
    "empty": "is an empty folder",
    "file": "is a file, not a model folder",
    "other architecture": "holds a 'bert' model, not a Whisper",
}


@pytest.mark.parametrize("case", WRONG)
def test_a_folder_that_is_no_model_gets_one_short_line(case, runs, tmp_path, capsys):
    run = runs["full"]
    if case == "run without checkpoints":
        target = tmp_path / "fresh-run"
        target.mkdir()
        shutil.copy(run / "config.json", target / "config.json")
        (target / "tensorboard").mkdir()
    elif case == "tensorboard":
        target = run / "tensorboard"
    elif case == "checkpoints folder":
        target = run / "checkpoints"
    elif case == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "file":
        target = run / "results.json"
    else:
        target = tmp_path / "bert"
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (target / "model.safetensors").write_bytes(b"")
    rc = run_evaluate_script("--model", target, "--output_dir", tmp_path / "out", f"--data.path={CORPUS}")
    lines = error_lines(capsys)
    assert rc == 2 and len(lines) == 1, lines  # one line, no transformers load report before it
    assert lines[0].startswith(f"error: --model {target} ") and WRONG[case] in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_demo_takes_a_step_checkpoint(kind, runs):
    from loop.ship.demo import Transcriber
    from loop.ship.demo_sources import card_name

    best_step = json.loads((runs[kind] / "results.json").read_text())["best_step"]
    checkpoint = runs[kind] / "checkpoints" / f"step_{best_step}"
    clip = sorted((CORPUS / "hi" / "clips").iterdir())[0]
    text, _ = Transcriber(checkpoint).transcribe_file(clip)
    assert text and text == Transcriber(runs[kind] / "best").transcribe_file(clip)[0]
    assert card_name(checkpoint) == f"run step_{best_step}"


@pytest.mark.slow  # a 2-step run of a 30-s-window model and an export with its parity check: about 2 minutes on 2 cores
def test_the_export_takes_a_step_checkpoint(tmp_path, session_cache_dir):
    """A 2-step run from the 30-s multilingual tiny Whisper of tests/export_models.py (the export refuses the 5-s
    models), its step_2 exported to CTranslate2; the parity check decodes both from the same clips."""
    pytest.importorskip("ctranslate2")
    from tests.export_models import build_multilingual_tiny_whisper
    from tests.helpers import load_script

    base = build_multilingual_tiny_whisper(tmp_path / "base")
    run = tmp_path / "run"
    train(run_config(run, base, session_cache_dir, "--data.max_train_samples=4", "--data.selection_size=4",
                     "--data.max_eval_samples=4", "--train.per_device_train_batch_size=4", "--train.max_steps=2",
                     "--train.save_steps=2", "--eval.eval_steps=2", "--train.learning_rate=1e-3",
                     "--model.encoder_window=full"))
    reset_accelerate()
    checkpoint = run / "checkpoints" / "step_2"
    output = tmp_path / "ct2"
    try:
        rc = load_script("export").main([str(a) for a in ("--model", checkpoint, "--output_dir", output,
                                                          "--parity_clips", 4, f"--data.cache_dir={session_cache_dir}")])
    finally:
        reset_accelerate()
    assert rc == 0
    parity = json.loads((output / "parity.json").read_text())
    assert not parity["failures"]
    info = json.loads((output / "export.json").read_text())
    assert info["source"] == str(checkpoint)
    assert (output / "README.md").read_text().startswith("# step_2 for faster-whisper")
