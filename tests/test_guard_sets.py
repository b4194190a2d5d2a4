"""Guard sets: configured from YAML or the command line, checked, evaluated at every evaluation in their own
language, and reported in TensorBoard, results.json, the log and the model card."""

import json

import pytest

from loop.config import ConfigError, GuardSet
from loop.config.loading import load_config
from loop.eval.guard_sets import guard_summary, language_id_drops
from loop.run.checkpoints import LoopState
from loop.train import train
from tests.helpers import CORPUS, run_config, tensorboard_scalars

ENGLISH = f"{{name: english, language: english, path: {CORPUS}, locale: en, max_samples: 4}}"


def test_the_quickstart_preset_guards_english():
    (guard,) = load_config("quickstart").eval.guard_sets
    assert guard == GuardSet(name="english", language="english", path="assets/cv-corpus-17.0-synthetic", locale="en",
                             split="test", max_samples=40)


def test_guard_sets_from_the_command_line_and_every_problem_named():
    config = load_config("quickstart", [f"--eval.guard_sets=[{ENGLISH}]"])
    assert [g.name for g in config.eval.guard_sets] == ["english"] and config.eval.guard_sets[0].max_samples == 4
    assert load_config("quickstart", ["--eval.guard_sets=[]"]).eval.guard_sets == []
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--eval.guard_sets=[{name: en, language: klingon, path: /nowhere},"
                                   " {name: en, language: en, path: assets, source: ftp}, {name: x, path: assets}]"])
    problems = caught.value.problems
    assert "eval.guard_sets[0].language 'klingon' is not a Whisper language" in problems
    assert "eval.guard_sets[0].path '/nowhere' does not exist" in problems
    assert "eval.guard_sets[1].name 'en' is used twice" in problems
    assert any(p.startswith("eval.guard_sets[1].source must be one of common_voice, hub, manifest") for p in problems)
    assert "eval.guard_sets[2].language is required (decoding is forced to it)" in problems
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--eval.guard_sets=[{name: en, language: en, path: assets, max_sample: 3}]"])
    assert any(p.startswith("command line: eval.guard_sets[0].max_sample is not a field of GuardSet (did you mean "
                            "max_samples?)") for p in caught.value.problems), caught.value.problems
    with pytest.raises(ConfigError, match="expected a list of mappings"):
        load_config("quickstart", ["--eval.guard_sets=[7]"])


def test_a_run_reports_each_guard_set_before_and_at_the_best_step(tmp_path, fast_model, session_cache_dir, capsys):
    config = run_config(
        tmp_path / "run", fast_model, session_cache_dir, "--data.max_train_samples=24", "--data.selection_size=8",
        "--data.max_eval_samples=4", "--train.per_device_train_batch_size=8", "--train.max_steps=2",
        "--eval.eval_steps=1", "--eval.eval_on_start=true", "--train.report_to=tensorboard",
        "--eval.generation_max_length=16", f"--eval.guard_sets=[{ENGLISH}]",
    )
    results = train(config)
    out = tmp_path / "run"
    guard = results["guard_sets"]["english"]
    assert guard["initial_step"] == 0 and guard["best_step"] == results["best_step"]
    for figures in (guard["initial"], guard["best"], guard["final"]):
        assert figures["num_utterances"] == 4 and 0 <= figures["language_id"] <= 100
        assert {"wer", "cer", "normalized_wer", "loop_share", "empty_share", "insertion_rate"} <= figures.keys()
    # The figures come from real decoding: each evaluation's entry holds them, the summary picks two of them.
    evaluations = json.loads((out / "results.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 1, 2] and all("english" in e["guards"] for e in evaluations)
    assert guard["initial"] == evaluations[0]["guards"]["english"]
    assert tensorboard_scalars(out, "guard/english/wer").keys() == {0, 1, 2}
    assert tensorboard_scalars(out, "guard/english/language_id").keys() == {0, 1, 2}
    assert tensorboard_scalars(out, "eval/loop_share").keys() == {0, 1, 2}
    assert results["selection_language_id"]["initial"] == evaluations[0]["language_id"]
    card = (out / "best" / "README.md").read_text()
    assert "## What it kept" in card and "| guard set english |" in card
    log = capsys.readouterr().out
    assert "guard english: WER" in log and "; guard english WER" in log


def test_guard_sets_are_decoded_in_their_own_language(decoding_checkpoint, tmp_path):
    """The same clips forced to English and to Hindi decode differently: the guard set's language reaches
    generation (the references' language decides the normalizer and the language-ID target)."""
    import torch
    from accelerate import Accelerator

    from loop.eval.evaluation import evaluate
    from loop.eval.guard_sets import attach_loaders, build_guard_sets
    from loop.model.features import LogMel
    from loop.model.loading import load_for_inference

    model, processor = load_for_inference(str(decoding_checkpoint))
    config = load_config("quickstart", [f"--model.name_or_path={decoding_checkpoint}", f"--data.cache_dir={tmp_path}",
                                        f"--eval.guard_sets=[{ENGLISH}]"])
    accelerator = Accelerator(cpu=True)
    (prepared,) = build_guard_sets(config, processor, model.config.max_target_positions)
    attach_loaders([prepared], config, model.config.decoder_start_token_id, accelerator)
    log_mel = LogMel(processor.feature_extractor)
    with torch.no_grad():
        decoded = {language: evaluate(model, prepared.loader, accelerator, processor.tokenizer, prepared.table["text"],
                                      "english", log_mel=log_mel, compute_loss=False, decode_language=language)
                   for language in ("english", "hindi")}
    english, hindi = ([p["hypothesis"] for p in decoded[language].predictions] for language in ("english", "hindi"))
    assert len(english) == 4 and english != hindi
    assert all(p["detected_language"] for p in decoded["english"].predictions)


def test_summary_and_language_id_warnings_from_the_evaluations():
    state = LoopState(best_step=2, evaluations=[
        {"step": 0, "wer": 90.0, "language_id": 80.0, "guards": {"english": {"wer": 15.0, "language_id": 100.0}}},
        {"step": 2, "wer": 40.0, "language_id": 78.0, "guards": {"english": {"wer": 25.0, "language_id": 95.0}}},
        {"step": 4, "wer": 45.0, "language_id": 60.0, "guards": {"english": {"wer": 40.0, "language_id": 70.0}}},
    ])
    summary = guard_summary(state.evaluations, state.best_step)
    assert summary == {"english": {"initial": {"wer": 15.0, "language_id": 100.0}, "initial_step": 0,
                                   "best": {"wer": 25.0, "language_id": 95.0}, "best_step": 2,
                                   "final": {"wer": 40.0, "language_id": 70.0}}}
    warnings = language_id_drops(state.evaluations, threshold=10.0)
    assert len(warnings) == 2
    assert warnings[0].startswith("language ID on the selection split fell from 80.0% at step 0 to 60.0% at step 4")
    assert warnings[1].startswith("language ID on guard set 'english' fell from 100.0% at step 0 to 70.0%")
    assert language_id_drops(state.evaluations, threshold=30.0) == []
    assert guard_summary([{"step": 0, "wer": 1.0}], 0) == {}
