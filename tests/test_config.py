"""Configuration: every problem in one ConfigError before anything loads, override forms and order, every preset."""

from __future__ import annotations

import json
import typing

import pytest
import transformers

from loop.config import SECTIONS, ConfigError, Range, RunConfig, field_docs, field_types, to_dict
from loop.config.loading import config_warnings, from_dict, list_presets, load_config, parse_overrides
from tests.helpers import load_script, reset_accelerate


@pytest.fixture
def no_model_loading(monkeypatch):
    """Configuration must be judged before any model or processor loads: loading one here fails the test. (What
    is replaced is transformers' loading, the one way in for loop.model.loading, not a function of ours.)"""

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model or processor was loaded while validating the configuration")

    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", must_not_load)
    monkeypatch.setattr(transformers.WhisperProcessor, "from_pretrained", must_not_load)


def test_every_problem_is_reported_at_once(tmp_path, no_model_loading):
    overrides = [
        "--train.learning_rate=-1",
        "--train.per_device_train_batch_size=0",
        "--model.task=transliterate",
        "--train.learnig_rate=1e-4",
        "--model.language=klingon",
        f"--model.name_or_path={tmp_path / 'no-such-model'}",
    ]
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", overrides)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert "train.learning_rate must be > 0, got -1.0" in problems
    assert "train.per_device_train_batch_size must be >= 1, got 0" in problems
    assert "model.task must be one of transcribe, translate, got 'transliterate'" in problems
    assert "command line: train.learnig_rate is not an option (did you mean train.learning_rate?)" in problems
    assert "model.language 'klingon' is not a Whisper language" in problems
    assert any(str(tmp_path / "no-such-model") in p and "does not exist" in p for p in problems)
    message = str(caught.value)  # the one message lists every problem, one per line
    assert message.startswith("invalid configuration:\n") and message.count("\n  - ") == 6


def test_problems_in_a_preset_file_and_the_command_line_are_collected_together(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("data:\n  num_proc: 0\n  sorce: hub\ntrian:\n  max_steps: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(preset), ["--train.max_steps=ten", "stray"])
    assert sorted(caught.value.problems) == sorted([
        "mine.yaml: data.sorce is not an option (did you mean data.source?)",
        "mine.yaml: unknown section 'trian' (did you mean 'train'?)",
        "command line: unexpected argument 'stray' (options look like --train.max_steps=100)",
        "command line: train.max_steps: expected an integer, got 'ten'",
        "data.path is required for data.source=common_voice",
        "data.num_proc must be >= 1, got 0",
    ])


def test_a_missing_preset_names_the_available_ones():
    with pytest.raises(ConfigError) as caught:
        load_config("quikstart", ["--data.path=assets/cv-corpus-17.0-synthetic"])
    assert caught.value.problems[0] == f"--config 'quikstart': no such preset or file (presets: {', '.join(list_presets())})"


def test_both_override_forms_and_the_override_order(tmp_path):
    assert RunConfig().train.learning_rate == 1e-5  # default
    config = load_config("quickstart")
    assert config.train.learning_rate == 2e-3  # preset over default
    assert config.train.weight_decay == 0.0 and config.eval.eval_steps == 100  # default kept, preset applied
    config = load_config("quickstart", [
        "--train.learning_rate", "5e-4",  # space form
        "--train.max_steps=50",  # = form
        "--eval.eval_steps", "25",
        "--data.train_splits=train",
        "--train.resume",  # a bare flag means true
        "--train.warmup_steps", "-0",  # a value may start with a single dash
    ], output_dir=str(tmp_path))
    assert config.train.learning_rate == 5e-4  # command line over preset
    assert (config.train.max_steps, config.eval.eval_steps, config.train.warmup_steps) == (50, 25, 0)
    assert config.data.train_splits == ["train"] and config.train.resume is True
    assert config.output_dir == str(tmp_path)  # --output_dir over the preset's runs/quickstart
    assert load_config("quickstart", ["--output_dir=elsewhere"]).output_dir == "elsewhere"


def test_parse_overrides_keeps_values_as_written():
    values, problems = parse_overrides(["--data.path", "/x y", "--train.seed=7", "--eval.eval_on_start", "--data.strict", "no"])
    assert values == {"data": {"path": "/x y", "strict": "no"}, "train": {"seed": "7"}, "eval": {"eval_on_start": "true"}}
    assert problems == []


def test_a_preset_file_with_an_empty_section_loads(tmp_path):
    # `eval:` with every key commented out is `eval: null` to YAML: it means "no changes", not an error.
    preset = tmp_path / "empty-section.yaml"
    preset.write_text("model:\n  name_or_path: assets/tiny-whisper-hi\ndata:\n  path: assets/cv-corpus-17.0-synthetic\n"
                      "eval:\n  # eval_steps: 10\n", encoding="utf-8")
    config = load_config(str(preset), ["--train.max_steps=2000"])
    assert config.eval.eval_steps == 1000 and config.model.name_or_path == "assets/tiny-whisper-hi"


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset, corpus_root):
    # The Common Voice presets leave data.path empty on purpose (the user's download): give them the shipped corpus.
    recipe = preset.startswith("whisper-small-hi") and preset != "whisper-small-hi-distil"
    overrides = [f"--data.path={corpus_root}"] if preset.startswith("whisper-") else []
    if preset == "whisper-small-hi-distil":  # its student and teacher are the user's folders, made by its launch lines
        tiny = str(corpus_root.parent / "tiny-whisper-hi")
        overrides += [f"--model.name_or_path={tiny}", f"--train.distill_from={tiny}"]
        with pytest.raises(ConfigError, match="train.distill_from 'runs/whisper-small-hi/best' does not exist"):
            load_config(preset, overrides[:1])
    config = load_config(preset, overrides)
    assert config.model.language == "hindi" and config.data.source == "common_voice"
    assert from_dict(to_dict(config)) == config  # what checkpoints save, they can load
    if preset == "whisper-small-hi-fast":  # the recipe, with the dynamic window and nothing else changed
        recipe_config = load_config("whisper-small-hi", [f"--data.path={corpus_root}"])
        recipe_config.model.encoder_window, recipe_config.output_dir = "dynamic", config.output_dir
        assert config == recipe_config
    if recipe:  # the reference recipe's values
        assert (config.model.name_or_path, config.train.learning_rate, config.train.max_steps) == ("openai/whisper-small", 1e-5, 4000)
        assert (config.train.warmup_steps, config.eval.eval_steps) == (500, 1000)
        # the recipe's batch 16, as 8 x 2 accumulation (the same update; fits a 16 GB GPU)
        assert config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps == 16
        assert (config.eval.generation_max_length, config.train.mixed_precision) == (225, "fp16")
    elif preset in ("whisper-large-v3-turbo-hi", "whisper-medium-hi"):  # full fine-tuning on one 24 GB GPU
        name = {"whisper-large-v3-turbo-hi": "openai/whisper-large-v3-turbo", "whisper-medium-hi": "openai/whisper-medium"}
        assert config.model.name_or_path == name[preset] and config.model.gradient_checkpointing
        assert config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps == 16
        assert (config.train.mixed_precision, config.eval.generation_max_length) == ("bf16", 225)
    elif preset == "whisper-small-hi-distil":  # distil-whisper's loss weights, the student's encoder frozen
        assert (config.train.distill_alpha_ce, config.train.distill_alpha_kl, config.train.distill_temperature) == (
            0.8, 1.0, 2.0)
        assert config.model.freeze_encoder and config.train.learning_rate == 1e-4
    elif preset == "quickstart":  # offline and on CPU
        assert config.model.name_or_path == "assets/tiny-whisper-hi" and config.train.mixed_precision == "no"


def test_the_presets_are_there():
    assert {"quickstart", "whisper-small-hi", "whisper-small-hi-fast", "whisper-large-v3-turbo-hi",
            "whisper-medium-hi"} <= set(list_presets())


def test_the_recipe_preset_needs_a_data_path():
    with pytest.raises(ConfigError) as caught:
        load_config("whisper-small-hi")
    assert caught.value.problems == ["data.path is required for data.source=common_voice"]


def test_type_errors_name_the_option_and_value():
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--train.seed=1.5", "--data.strict=maybe", "--train.learning_rate=fast"])
    assert sorted(caught.value.problems) == [
        "command line: data.strict: expected true or false, got 'maybe'",
        "command line: train.learning_rate: expected a number, got 'fast'",
        "command line: train.seed: expected an integer, got '1.5'",
    ]


def test_a_short_smoke_run_of_a_preset_is_allowed():
    """The first thing users try: a preset cut to a few steps. Warmup longer than the run and evaluation intervals
    past its end are allowed (the last step always evaluates); the warmup is said as a warning."""
    config = load_config("quickstart", ["--train.max_steps=20"])
    assert (config.train.max_steps, config.train.warmup_steps, config.eval.eval_steps) == (20, 50, 100)
    (warning,) = config_warnings(config)
    assert "train.warmup_steps (50) is larger than train.max_steps (20)" in warning and "40%" in warning
    assert config_warnings(load_config("quickstart")) == []
    (compiled,) = config_warnings(load_config("quickstart", ["--train.torch_compile", "--model.encoder_window=dynamic"]))
    assert "compiled with dynamic shapes (one graph for every window length" in compiled


def _outside(limit: Range):
    """A value the range refuses."""
    if limit.low is not None:
        return limit.low if limit.low_open else limit.low - 1
    return limit.high if limit.high_open else limit.high + 1


def test_every_choice_and_bound_in_the_types_is_enforced():
    """Each `Literal` and `Range` field, set to a value its type refuses, is reported by name, all at once."""
    overrides, expected = [], []
    for section, cls in SECTIONS.items():
        for name, kind in field_types(cls).items():
            metadata = getattr(kind, "__metadata__", ())
            if getattr(kind, "__origin__", None) is typing.Literal:
                overrides.append(f"--{section}.{name}=not-a-choice")
                expected.append(f"{section}.{name} must be one of ")
            for limit in (m for m in metadata if isinstance(m, Range)):
                overrides.append(f"--{section}.{name}={_outside(limit)}")
                expected.append(f"{section}.{name} must be {limit.describe()}, got ")
    assert len(expected) >= 25  # most fields carry their bounds
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", overrides)
    for start in expected:
        assert any(problem.startswith(start) for problem in caught.value.problems), start


def test_short_forms_and_options_without_a_section():
    assert load_config("quickstart", ["--resume"]).train.resume is True  # what users of other tools type
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--max_steps=5", "--learning-rate=1"])
    assert caught.value.problems == [
        "command line: unknown option --max_steps (did you mean --train.max_steps?)",
        "command line: unknown option --learning-rate (options look like --section.key=value)",
    ]


@pytest.mark.parametrize("script, sections", [
    ("train", ("data", "model", "train", "eval", "augment")), ("prepare_data", ("data", "model")),
    ("evaluate", ("data", "model", "eval")),
])
def test_help_lists_every_option_with_its_docstring(script, sections, capsys):
    with pytest.raises(SystemExit) as exited:
        load_script(script).main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for section in sections:
        for name, doc in field_docs(SECTIONS[section]).items():
            assert f"--{section}.{name}=" in text, name
            assert doc[:60] in text, name  # the field's own docstring, not a copy that can drift
    assert "--data.source=common_voice (one of common_voice, hub, manifest, shards)" in text
    assert "--train.per_device_train_batch_size" not in text or "train" in sections


@pytest.mark.parametrize("script", ["demo", "make_tiny_model", "make_synthetic_corpus", "train"])
def test_every_script_has_help(script, capsys):
    with pytest.raises(SystemExit) as exited:
        load_script(script).main(["--help"])
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out


def saved_run(tmp_path, *overrides):
    """An output folder holding a checkpoint of a quickstart run with `overrides`, its config saved as
    `save_checkpoint` saves it."""
    config = load_config("quickstart", list(overrides), str(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "run_config.json").write_text(json.dumps(to_dict(config)), encoding="utf-8")
    (checkpoint / "loop_state.json").write_text(json.dumps({"step": 5}), encoding="utf-8")
    return config


def test_a_resume_that_would_not_continue_the_saved_run_is_refused(tmp_path, capsys):
    from accelerate import Accelerator

    from loop.run.output_dir import prepare_output_dir

    saved_run(tmp_path, "--train.per_device_train_batch_size=16")
    resume = ["--resume", "--train.per_device_train_batch_size=8", "--train.seed=7", "--data.selection_size=20",
              "--train.learning_rate=1e-3", "--train.max_steps=2000", "--data.num_proc=1"]
    try:
        with pytest.raises(ConfigError) as caught:
            prepare_output_dir(load_config("quickstart", resume, str(tmp_path / "run")), Accelerator(cpu=True))
        problems = caught.value.problems
        assert problems[:3] == [
            "--train.resume: data.selection_size was 40 in step_5, now 20",
            "--train.resume: train.per_device_train_batch_size was 16 in step_5, now 8",
            "--train.resume: train.seed was 42 in step_5, now 7",
        ] and "--train.allow_config_change=true" in problems[3] and len(problems) == 4
        # Changes that keep the data and its order are applied and listed; with the flag, so are the others.
        prepare_output_dir(load_config("quickstart", [*resume, "--train.allow_config_change=true"],
                                       str(tmp_path / "run")), Accelerator(cpu=True))
        printed = capsys.readouterr().out
        for line in ("train.learning_rate changed: 0.002 in step_5 -> 0.001", "train.max_steps changed: 1000",
                     "train.seed changed: 42 in step_5 -> 7", "data.num_proc changed: 2 in step_5 -> 1"):
            assert f"resuming with {line}" in printed, line
    finally:
        reset_accelerate()


def test_the_data_section_mix_entries_and_guard_sets_share_one_source_dataclass(corpus_root):
    """The source fields are written once (`SourceConfig`): each of the three has all of them, the guard set's
    Hub revision included, and the guard set's run reads its own revision rather than the data section's."""
    from loop.config import DataConfig, GuardSet, MixSource, SourceConfig
    from loop.eval.guard_sets import guard_run_config

    shared = set(SourceConfig.__dataclass_fields__)
    for kind in (DataConfig, MixSource, GuardSet):
        assert issubclass(kind, SourceConfig) and shared <= set(kind.__dataclass_fields__)
        assert field_docs(kind)["dataset_revision"]  # the base's docstrings reach --help and the docs
    config = load_config(None, [f"--data.path={corpus_root}", "--data.dataset_revision=main",
                                "--eval.guard_sets=[{name: fleurs, language: en, source: hub, "
                                "dataset_name: google/fleurs, dataset_revision: refs/convert/parquet}]"])
    guard_data = guard_run_config(config, config.eval.guard_sets[0]).data
    assert (guard_data.source, guard_data.dataset_revision) == ("hub", "refs/convert/parquet")
    assert config.data.dataset_revision == "main" and config.data.locale == "hi"


def test_a_language_is_looked_up_in_one_place():
    from loop.languages import language_code, language_name, language_problem

    assert [language_code(x) for x in ("hindi", "Hindi", " hi ", "english")] == ["hi", "hi", "hi", "en"]
    assert language_name("hi") == language_name("HINDI") == "hindi"
    assert language_problem("hindi", "model.language") == ""
    assert language_problem("hindu", "model.language") == ("model.language 'hindu' is not a Whisper language "
                                                           "(did you mean 'hindi'?)")
    with pytest.raises(ConfigError, match=r"data.mix\[0\] \(en\).language 'englsh' is not a Whisper language "
                                          r"\(did you mean 'english'\?\)"):
        load_config(None, ["--data.path=assets/cv-corpus-17.0-synthetic",
                           "--data.mix=[{name: en, weight: 0.2, path: assets/cv-corpus-17.0-synthetic, "
                           "language: englsh}]"])
