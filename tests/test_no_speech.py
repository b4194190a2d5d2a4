"""No-speech rows (`data.no_speech_fraction`): the seeded recipe, generated and folder rows, their labels, the
cache and its fingerprint, their count in the data report, and a model trained with them saying nothing on
silence where one trained without them speaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from loop.config import ConfigError
from loop.config.loading import load_config
from loop.data.audio import SAMPLE_RATE, dequantize
from loop.data.no_speech import (
    GENERATED_KINDS,
    LEVEL_DBFS,
    no_speech_count,
    no_speech_recipe,
    no_speech_rows,
    pink_noise,
    synthesize,
)
from loop.data.splits import build_datasets

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: a second thread only waits
DURATIONS = [1.25, 2.5, 3.75]


def waveforms(table) -> list[np.ndarray]:
    return [dequantize(row["audio"], row["audio_scale"]) for row in table.with_format("numpy")]


def rms_dbfs(waveform: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(waveform.astype(np.float64) ** 2)))


def test_the_count_makes_the_fraction_of_all_rows():
    assert no_speech_count(80, 0.2) == 20 and no_speech_count(80, 0) == 0 and no_speech_count(0, 0.5) == 0
    for speech, fraction in ((48, 0.2), (300, 0.05), (7, 0.5)):
        count = no_speech_count(speech, fraction)
        assert abs(count / (speech + count) - fraction) <= 1 / (speech + count)


def test_the_recipe_is_seeded_and_draws_lengths_kinds_and_levels():
    recipe = no_speech_recipe(300, DURATIONS, seed=3)
    assert recipe == no_speech_recipe(300, DURATIONS, seed=3)
    assert recipe != no_speech_recipe(300, DURATIONS, seed=4)
    assert set(recipe["samples"]) == {round(d * SAMPLE_RATE) for d in DURATIONS}  # lengths are the real ones
    assert set(recipe["kind"]) == set(GENERATED_KINDS)
    assert all(LEVEL_DBFS[0] <= level <= LEVEL_DBFS[1] for level in recipe["level_db"])
    assert len(set(recipe["level_db"])) > 200  # random levels, not a handful


def test_generated_rows_are_silence_or_noise_at_their_level_with_the_empty_label(processor, tmp_path):
    table = no_speech_rows(24, DURATIONS, seed=0, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    recipe = no_speech_recipe(24, DURATIONS, seed=0)
    tokens = processor.tokenizer.convert_ids_to_tokens(table[0]["labels"])
    assert tokens == ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>"]
    assert all(labels == table[0]["labels"] for labels in table["labels"])
    assert set(table["text"]) == {""} and set(table["utterances"]) == {0} and set(table["skip_reason"]) == {""}
    for waveform, kind, level, samples, duration in zip(waveforms(table), recipe["kind"], recipe["level_db"],
                                                        recipe["samples"], table["duration"]):
        assert len(waveform) == samples == round(duration * SAMPLE_RATE)
        if kind == "silence":
            assert not waveform.any()  # digital silence
        else:
            assert rms_dbfs(waveform) == pytest.approx(level, abs=0.1)


def test_pink_noise_falls_3_db_per_octave():
    power = np.abs(np.fft.rfft(pink_noise(2**16, np.random.default_rng(0)))) ** 2
    bins = np.arange(64, len(power))
    slope = np.polyfit(np.log2(bins), 10 * np.log10(power[bins]), 1)[0]  # dB per octave, fitted over 9 octaves
    assert slope == pytest.approx(-3.0, abs=0.1)
    white = synthesize("white", 2**14, -40, np.random.default_rng(0))
    assert white.dtype == np.float32 and rms_dbfs(white) == pytest.approx(-40, abs=1e-3)


def test_rows_come_from_the_cache_and_its_name_follows_the_seed(processor, tmp_path):
    first = no_speech_rows(6, DURATIONS, seed=0, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    again = no_speech_rows(6, DURATIONS, seed=0, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    other = no_speech_rows(6, DURATIONS, seed=1, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    assert [f["filename"] for f in first.cache_files] == [f["filename"] for f in again.cache_files]
    assert first.cache_files[0]["filename"] != other.cache_files[0]["filename"]
    assert len(list(tmp_path.glob("no_speech-*.arrow"))) == 2
    assert all(np.array_equal(a, b) for a, b in zip(waveforms(first), waveforms(again)))


def test_their_cache_is_reused_only_under_a_completion_marker(processor, tmp_path):
    """As the prepared splits: a cache file cut short (a crash before it was durable) is made again, not read."""
    first = no_speech_rows(6, DURATIONS, seed=0, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    expected = waveforms(first)
    cache_file = Path(first.cache_files[0]["filename"])
    markers = list(tmp_path.glob("no_speech-*.complete.json"))
    assert [m.name for m in markers] == [cache_file.name.replace(".arrow", ".complete.json")]
    del first
    cache_file.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])
    again = no_speech_rows(6, DURATIONS, seed=0, tokenizer=processor.tokenizer, cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(waveforms(again), expected))
    assert len(again) == 6 and cache_file.stat().st_size > 0


def test_rows_from_a_folder_are_excerpts_of_its_clips(processor, tmp_path):
    folder = tmp_path / "noise"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(SAMPLE_RATE * 4).astype(np.float32),
             0.05 * rng.standard_normal(SAMPLE_RATE).astype(np.float32)]  # 1 s: shorter than most drawn lengths
    sf.write(folder / "a.wav", clips[0], SAMPLE_RATE, subtype="FLOAT")
    sf.write(folder / "sub" / "b.flac", clips[1], SAMPLE_RATE)
    table = no_speech_rows(12, DURATIONS, seed=0, tokenizer=processor.tokenizer, noise_dir=str(folder),
                           cache_dir=tmp_path / "cache")
    recipe = no_speech_recipe(12, DURATIONS, seed=0, clip_sizes=[len(c) for c in clips])
    assert set(recipe["clip"]) == {0, 1}
    for waveform, clip, offset in zip(waveforms(table), recipe["clip"], recipe["offset"]):
        expected = clips[clip][offset: offset + len(waveform)]
        assert len(waveform) == len(expected) <= len(clips[clip])
        np.testing.assert_allclose(waveform, expected, atol=2e-4)  # FLAC's 16 bits and the cache's int16
    with pytest.raises(ConfigError, match="data.no_speech_dir"):
        no_speech_rows(2, DURATIONS, 0, processor.tokenizer, noise_dir=str(tmp_path / "cache"), cache_dir=tmp_path)


def test_build_datasets_adds_and_reports_them(processor, max_target_positions, session_cache_dir):
    config = load_config("quickstart", [f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1",
                                        "--data.max_train_samples=40", "--data.no_speech_fraction=0.2"])
    data = build_datasets(config, processor, max_target_positions)
    report = data.report_dict()["train"]
    assert report["kept"] == 40 and report["no_speech"] == 10 and len(data.train) == 50
    assert data.train["text"][40:] == [""] * 10 and "" not in data.train["text"][:40]
    assert set(data.train["duration"][40:]) <= set(data.train["duration"][:40])  # lengths drawn from the rows'
    assert len(data.selection) == len(build_datasets(load_config("quickstart", [
        f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1", "--data.max_train_samples=40"]),
        processor, max_target_positions).selection)  # evaluation splits get none
    assert "no-speech rows" in data.reports["train"].summary()


def test_the_options_are_checked(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", ["--data.no_speech_fraction=1", f"--data.no_speech_dir={tmp_path / 'none'}"])
    assert any("data.no_speech_fraction must be in [0, 1)" in p for p in error.value.problems)
    assert any("data.no_speech_dir" in p and "is not a folder" in p for p in error.value.problems)


# --- what they teach -----------------------------------------------------------------------------------------

def silent_clips(count: int = 12) -> list[np.ndarray]:
    """Silence and quiet noise of 1-4 s, drawn apart from any run's no-speech rows (another generator)."""
    rng = np.random.default_rng(12345)
    kinds = ["silence", "white", "pink"]
    return [synthesize(kinds[i % 3], int(rng.uniform(1, 4) * SAMPLE_RATE), rng.uniform(-70, -40), rng)
            for i in range(count)]


def empty_share(model_dir, clips) -> float:
    """Share of `clips` that the saved model at `model_dir` transcribes as the empty string."""
    from loop.data.no_speech import allow_empty_transcripts
    from loop.model.decoding import transcribe
    from loop.model.loading import load_for_inference

    model, processor = load_for_inference(str(model_dir))
    allow_empty_transcripts(model.generation_config)  # both models may end at once: what they learned decides
    features = processor.feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    texts = transcribe(model.eval(), features, processor.tokenizer)
    return sum(text == "" for text in texts) / len(texts)


@pytest.mark.slow
def test_a_model_trained_with_them_says_nothing_on_silence(tmp_path, fast_model, session_cache_dir):
    """The same 16-utterance run with and without a 25% share of no-speech rows: on 12 clips of silence and
    quiet noise it never saw, decoded with the end allowed as the first token for both, the model trained with
    them gives the empty transcript for most, the other for few (it learned that every clip holds words). The
    run with them saves a generation config that allows the empty transcript; the other keeps Whisper's."""
    from loop.train import train
    from tests.test_train import memorising_run

    shares = {}
    for fraction in (0.0, 0.25):
        _, config = memorising_run(
            tmp_path / f"f{fraction}", fast_model, session_cache_dir, 16, f"--data.no_speech_fraction={fraction}",
            "--train.per_device_train_batch_size=8", "--train.warmup_steps=10", "--train.max_steps=100",
            "--eval.eval_steps=100", "--train.save_steps=100", "--eval.generation_max_length=32",
            "--train.report_to=none",
        )
        results = train(config)
        assert results["data"]["train"].get("no_speech", 0) == no_speech_count(16, fraction)
        best = tmp_path / f"f{fraction}" / "out" / "best"
        saved = json.loads((best / "generation_config.json").read_text())
        assert (saved["eos_token_id"] in (saved.get("begin_suppress_tokens") or [])) == (fraction == 0)
        shares[fraction] = empty_share(best, silent_clips())
        from tests.helpers import reset_accelerate

        reset_accelerate()
    assert shares[0.25] >= 0.75 and shares[0.0] <= 0.25, shares
