"""Configuration: every problem in one ConfigError before anything loads, override forms and order, every preset."""

from __future__ import annotations

import pytest
import transformers

from loop.config import (
    ConfigError,
    RunConfig,
    from_dict,
    list_presets,
    load_config,
    parse_overrides,
    to_dict,
)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Configuration must be judged before any model or processor loads: loading one here fails the test. (What
    is replaced is transformers' loading, the one way in for loop.model, not a function of ours.)"""

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model or processor was loaded while validating the configuration")

    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", must_not_load)
    monkeypatch.setattr(transformers.WhisperProcessor, "from_pretrained", must_not_load)


def test_every_problem_is_reported_at_once(tmp_path, no_model_loading):
    overrides = [
        "--train.learning_rate=-1",
        "--train.per_device_train_batch_size=0",
        "--eval.eval_steps=5000",  # the preset runs 1000 steps
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
    assert "eval.eval_steps (5000) is larger than train.max_steps (1000): no evaluation would run" in problems
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
    # whisper-small-hi leaves data.path empty on purpose (the user's download): give it the shipped corpus.
    config = load_config(preset, [f"--data.path={corpus_root}"] if preset == "whisper-small-hi" else [])
    assert config.model.language == "hindi" and config.data.source == "common_voice"
    assert from_dict(to_dict(config)) == config  # what checkpoints save, they can load
    if preset == "whisper-small-hi":  # the reference recipe's values
        assert (config.model.name_or_path, config.train.learning_rate, config.train.max_steps) == ("openai/whisper-small", 1e-5, 4000)
        assert (config.train.warmup_steps, config.eval.eval_steps) == (500, 1000)
        # the recipe's batch 16, as 8 x 2 accumulation (the same update; fits a 16 GB GPU)
        assert config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps == 16
        assert (config.eval.generation_max_length, config.train.mixed_precision) == (225, "fp16")
    elif preset == "quickstart":  # offline and on CPU
        assert config.model.name_or_path == "assets/tiny-whisper-hi" and config.train.mixed_precision == "no"


def test_both_presets_are_there():
    assert {"quickstart", "whisper-small-hi"} <= set(list_presets())


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
