"""Timestamps: speech bounds by energy on audio with known silence, the deterministic choice of rows, timestamped
labels for clips and packed rows, the cache fingerprint, the timestamp metrics on hand-made token sequences,
scripts/evaluate.py --timestamps, and (slow) training with and without a timestamp share on a small Whisper."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loop.data.audio import SAMPLE_RATE
from loop.data.timestamp_labels import (
    TimestampSettings,
    TimestampTokens,
    quantize_down,
    quantize_up,
    speech_bounds,
    timestamp_label_ids,
    wants_timestamps,
)
from loop.eval.timestamps import (
    boundary_error,
    evaluate_timestamps,
    parse_timestamps,
    score_timestamps,
)
from tests.test_data import prepare_small


def clip(*parts: tuple[float, float], seed: int = 0) -> np.ndarray:
    """(seconds, level) parts end to end: level 0 is digital silence, else noise with that standard deviation
    (broadband, like speech's fricatives and far from a pure tone's single bin)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, level, round(seconds * SAMPLE_RATE)) if level else
                           np.zeros(round(seconds * SAMPLE_RATE)) for seconds, level in parts]).astype(np.float32)


# --- speech bounds --------------------------------------------------------------------------------------------

def test_speech_bounds_leave_out_the_silence_around_speech():
    assert speech_bounds(clip((0.5, 0), (1.0, 0.3), (0.3, 0))) == (0.5, 1.5)
    # hiss 50 dB below the speech around it is silence too; a soft onset 25 dB below it is speech
    hiss = 0.3 * 10 ** (-50 / 20)
    assert speech_bounds(clip((0.4, hiss), (0.2, 0.3 * 10 ** (-25 / 20)), (1.0, 0.3), (0.6, hiss))) == (0.4, 1.6)


def test_speech_bounds_round_outward_to_the_timestamp_grid_and_ignore_the_level():
    """Speech from 0.51 to 1.53 s lies in the 0.02-s frames from 0.50 to 1.54: the start rounds down, the end up."""
    audio = clip((0.51, 0), (1.02, 0.3), (0.47, 0))
    assert speech_bounds(audio) == (0.5, 1.54)
    assert speech_bounds(audio * 0.01) == (0.5, 1.54)  # 40 dB quieter: the rule is relative to the clip's peak


def test_a_clip_with_no_speech_is_all_speech_and_bounds_never_pass_the_clip():
    assert speech_bounds(np.zeros(SAMPLE_RATE, dtype=np.float32)) == (0.0, 1.0)
    assert speech_bounds(clip((1.0, 1e-5))) == (0.0, 1.0)  # -100 dBFS: nothing to find
    assert speech_bounds(clip((0.3, 0), (0.705, 0.3))) == (0.3, 1.02)  # ends inside its last (short) frame
    assert speech_bounds(np.zeros(0, dtype=np.float32)) == (0.0, 0.0)
    assert (quantize_up(0.06), quantize_down(0.06), quantize_up(0.061), quantize_down(0.079)) == (0.06, 0.06, 0.08, 0.06)


def test_the_shipped_clips_have_their_trimmed_silence_found(prepared_timestamps):
    """espeak-ng's clips were trimmed to 0.2 s of silence at each end (assets/README.md): the speech bounds start
    near 0.2 s and end near 0.2 s before the clip's end (plus the MP3 encoder's padding)."""
    table = prepared_timestamps["single"]
    starts = [segments[0][0] for segments in table["segments"]]
    tails = [duration - segments[0][1] for duration, segments in zip(table["duration"], table["segments"])]
    assert all(0.1 <= start <= 0.26 for start in starts), starts
    assert all(0.1 <= tail <= 0.35 for tail in tails), tails


# --- which rows, and their labels ------------------------------------------------------------------------------

def test_the_choice_of_rows_is_a_deterministic_share():
    origins = [f"train.tsv row {i}" for i in range(2000)]
    half = TimestampSettings(0.5, seed=42)
    chosen = [wants_timestamps(origin, half) for origin in origins]
    assert 900 <= sum(chosen) <= 1100
    assert chosen == [wants_timestamps(origin, TimestampSettings(0.5, seed=42)) for origin in origins]
    assert chosen != [wants_timestamps(origin, TimestampSettings(0.5, seed=43)) for origin in origins]
    assert not any(wants_timestamps(origin, TimestampSettings(0.0)) for origin in origins)
    assert all(wants_timestamps(origin, TimestampSettings(1.0)) for origin in origins)
    fifth = sum(wants_timestamps(origin, TimestampSettings(0.2, seed=42)) for origin in origins)
    assert 320 <= fifth <= 480
    assert all(chosen[i] for i in range(2000) if wants_timestamps(origins[i], TimestampSettings(0.2, seed=42)))


def test_timestamp_tokens_come_from_the_tokenizer(processor):
    tokenizer = processor.tokenizer
    tokens = TimestampTokens(tokenizer)
    for seconds in (0.0, 0.02, 1.5, 29.98, 30.0):
        assert tokens.token(seconds) == tokenizer.convert_tokens_to_ids(f"<|{seconds:.2f}|>")
        assert tokens.seconds(tokens.token(seconds)) == seconds
    assert tokens.no_timestamps == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    with pytest.raises(ValueError, match="outside Whisper's timestamps"):
        tokens.token(30.02)


def test_timestamped_labels_spell_one_segment_per_utterance(processor):
    tokenizer = processor.tokenizer
    tokens = TimestampTokens(tokenizer)
    texts = [tokenizer(" " + text, add_special_tokens=False).input_ids for text in ("नमस्ते", "फिर मिलेंगे")]
    ids = timestamp_label_ids(tokenizer, tokens, [(0.2, 1.04), (1.5, 3.0)], texts)
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|0.20|>"]
    assert ids[4 : 4 + len(texts[0])] == texts[0]
    assert tokenizer.convert_ids_to_tokens(ids[4 + len(texts[0]) : 6 + len(texts[0])]) == ["<|1.04|>", "<|1.50|>"]
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|3.00|>", "<|endoftext|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "नमस्ते फिर मिलेंगे"


@pytest.fixture(scope="module")
def prepared_timestamps(tmp_path_factory, processor):
    """The first 16 test rows prepared one by one and packed to the tiny model's 5-s window, every row with
    timestamps, and the same rows with none."""
    import datasets

    from loop.data.sources import UTTERANCE_FEATURES, SkipLog, read_common_voice_split
    from tests.helpers import CORPUS

    rows = read_common_voice_split(CORPUS / "hi", "test", SkipLog())[:16]
    utterances = datasets.Dataset.from_list(rows, features=UTTERANCE_FEATURES)
    cache = tmp_path_factory.mktemp("timestamps-cache")
    every = TimestampSettings(1.0, seed=42)
    return {
        "single": prepare_small(utterances, processor, cache, name="train", timestamps=every)[0],
        "packed": prepare_small(utterances, processor, cache, name="train", timestamps=every, pack_to_seconds=5)[0],
        "plain": prepare_small(utterances, processor, cache, name="train")[0],
        "utterances": utterances,
        "cache": cache,
    }


def test_clips_get_one_segment_at_their_speech_bounds(prepared_timestamps, processor):
    tokenizer = processor.tokenizer
    tokens = TimestampTokens(tokenizer)
    single, plain = prepared_timestamps["single"], prepared_timestamps["plain"]
    assert all(single["timestamped"]) and not any(plain["timestamped"])
    assert single["segments"] == plain["segments"] and single["text"] == plain["text"]
    for labels, segments, text in zip(single["labels"], single["segments"], single["text"]):
        names = tokenizer.convert_ids_to_tokens(labels)
        assert "<|notimestamps|>" not in names and names[:3] == ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>"]
        (start, end), = segments
        assert [tokens.seconds(t) for t in labels if tokens.is_timestamp(t)] == [pytest.approx(start), pytest.approx(end)]
        assert labels[3] == tokens.token(start) and labels[-2] == tokens.token(end)
        assert tokenizer.decode(labels, skip_special_tokens=True).strip() == text
    for labels in plain["labels"]:  # without a share, the labels are as they always were
        assert tokenizer.convert_ids_to_tokens(labels)[3] == "<|notimestamps|>"


def test_packed_rows_get_a_segment_per_utterance_at_its_offset(prepared_timestamps, processor):
    tokenizer = processor.tokenizer
    tokens = TimestampTokens(tokenizer)
    single, packed = prepared_timestamps["single"], prepared_timestamps["packed"]
    by_id = dict(zip(single["id"], zip(single["segments"], single["duration"])))
    assert len(packed) < len(single) and max(packed["utterances"]) > 1
    for row in packed:
        ids = row["id"].split(" + ")
        assert len(row["segments"]) == len(ids) == row["utterances"]
        offset = 0.0
        for (start, end), clip_id in zip(row["segments"], ids):
            (clip_start, clip_end), = by_id[clip_id][0]
            assert start == pytest.approx(quantize_down(offset + clip_start), abs=1e-4)
            assert end == pytest.approx(quantize_up(offset + clip_end), abs=1e-4)
            offset += by_id[clip_id][1]
        times = [tokens.seconds(t) for t in row["labels"] if tokens.is_timestamp(t)]
        assert times == pytest.approx([t for segment in row["segments"] for t in segment], abs=1e-4)
        assert times == sorted(times) and times[-1] <= 5.0
        assert tokenizer.decode(row["labels"], skip_special_tokens=True).strip() == row["text"]


def test_the_share_is_in_the_cache_and_its_name(prepared_timestamps, processor):
    """A share of the rows is timestamped, the same on a second preparation (read from the cache, whose name
    changes with the share and the seed) and in the report."""
    from loop.data.prepare import SplitReport, prepare

    utterances, cache = prepared_timestamps["utterances"], prepared_timestamps["cache"]

    def run(fraction, seed=42):
        report = SplitReport("train")
        table = prepare(utterances, processor.feature_extractor, processor.tokenizer, report, cache_dir=cache,
                        max_duration_s=30.0, max_label_length=256, timestamps=TimestampSettings(fraction, seed))
        return table, report

    half, report = run(0.5)
    expected = [wants_timestamps(origin, TimestampSettings(0.5, 42)) for origin in utterances["origin"]]
    assert half["timestamped"] == expected and 0 < sum(expected) < 16
    assert report.as_dict()["timestamped"] == sum(expected) and report.kept == 16
    again, _ = run(0.5)
    assert again.cache_files == half.cache_files and again["labels"] == half["labels"]
    names = {run(fraction, seed)[0].cache_files[0]["filename"] for fraction, seed in ((0.5, 42), (0.5, 7), (0, 42))}
    assert len(names) == 3
    assert "timestamped" not in run(0)[1].as_dict()


def test_rows_whose_timestamped_labels_are_too_long_are_skipped_like_the_others(prepared_timestamps, processor):
    """With a label limit that the plain labels of every row fit but the longest timestamped ones pass, those rows
    are skipped as labels_too_long; packing leaves room for the timestamps, so no packed row is."""
    plain, single = prepared_timestamps["plain"], prepared_timestamps["single"]
    limit = max(len(labels) for labels in plain["labels"])  # timestamps add 2 tokens, drop 1 (and a leading space)
    longest = sum(len(labels) > limit for labels in single["labels"])
    table, report = prepare_small(prepared_timestamps["utterances"], processor, prepared_timestamps["cache"],
                                  name="train", max_label_length=limit, timestamps=TimestampSettings(1.0, 42))
    assert report.skips.counts == {"labels_too_long": longest} and longest > 0
    assert "with timestamps (data.timestamp_fraction)" in report.skips.messages["labels_too_long"][0]
    assert max(len(labels) for labels in table["labels"]) <= limit
    packed, packed_report = prepare_small(
        prepared_timestamps["utterances"], processor, prepared_timestamps["cache"], name="train",
        max_label_length=60, pack_to_seconds=5, timestamps=TimestampSettings(1.0, 42))
    assert max(packed["utterances"]) > 1 and max(len(labels) for labels in packed["labels"]) <= 60
    assert all(len(row["segments"]) == row["utterances"] for row in packed)
    assert packed_report.kept + sum(packed_report.skips.counts.values()) == 16


# --- the metrics ------------------------------------------------------------------------------------------------

EOT = 400  # the tiny tokenizer's <|endoftext|>, the first special token after its 400 text tokens


@pytest.fixture(scope="module")
def tokens(processor):
    assert processor.tokenizer.eos_token_id == EOT
    return TimestampTokens(processor.tokenizer)


def sequence(tokens, *parts):
    """Hand-made output: floats are timestamps, strings are text tokens (id 5), "eot" the end."""
    return [EOT if part == "eot" else tokens.token(part) if isinstance(part, float) else 5 for part in parts]


def parse(tokens, *parts, duration=5.0):
    return parse_timestamps(sequence(tokens, *parts), tokens, first_special=EOT, duration=duration)


def test_well_formed_outputs_parse_into_their_segments(tokens):
    parsed = parse(tokens, 0.2, "a", "b", 1.5, 1.5, "c", 3.0, "eot")
    assert parsed.well_formed and parsed.segments == [(0.2, 1.5), (1.5, 3.0)]
    prompt = [EOT + 1, EOT + 2, tokens.no_timestamps - 5]  # other special tokens (the prompt) are ignored
    with_prompt = parse_timestamps(prompt + sequence(tokens, 0.0, "a", 1.0), tokens, EOT, 5.0)
    assert with_prompt.well_formed and with_prompt.segments == [(0.0, 1.0)]


@pytest.mark.parametrize("parts, problem", [
    ((0.2, "a", 1.5, 1.0, "b", 3.0), "not_increasing"),  # the second segment starts before the first ended
    ((1.5, "a", 1.5), "not_increasing"),  # a segment of no length
    ((0.2, "a", "b", "eot"), "unpaired"),  # opened, never closed: what a model that lost timestamps emits
    (("a", 0.2, "b", 1.0), "unpaired"),  # text before the first timestamp
    ((0.2, 1.0, "a", 2.0), "unpaired"),  # a segment with no text
    ((0.2, "a", 5.4), "out_of_range"),  # past the 5-s audio (0.2 s of slack)
    (("a", "b", "eot"), "no_timestamps"),
])
def test_malformed_outputs_are_named(tokens, parts, problem):
    parsed = parse(tokens, *parts)
    assert not parsed.well_formed and problem in parsed.problems, parsed


def test_notimestamps_and_a_clip_end_within_the_slack(tokens):
    assert parse_timestamps([tokens.no_timestamps, 5, 5], tokens, EOT, 5.0).problems == ["no_timestamps"]
    assert parse(tokens, 0.2, "a", 5.2).well_formed


def test_boundary_error_against_known_offsets(tokens):
    reference = [(0.2, 1.5), (1.8, 3.0)]
    assert boundary_error([(0.2, 1.5), (1.8, 3.0)], reference) == 0.0
    assert boundary_error([(0.3, 1.4), (1.8, 3.2)], reference) == pytest.approx((0.1 + 0.0 + 0.1 + 0.2) / 4)
    # one segment for both utterances: starts 0.0 and 1.6 off, ends 1.5 and 0.0 off
    assert boundary_error([(0.2, 3.0)], reference) == pytest.approx((0.0 + 1.6 + 1.5 + 0.0) / 4)
    assert boundary_error([], reference) is None
    scores = score_timestamps([parse(tokens, 0.3, "a", 1.4, 1.8, "b", 3.2), parse(tokens, 0.2, "a", "eot")],
                              [reference, reference])
    assert scores["rows"] == 2 and scores["well_formed_percent"] == 50.0
    assert scores["segment_count_match_percent"] == 50.0 and scores["rows_with_segments"] == 1
    assert scores["boundary_error_s"] == pytest.approx(0.1) and scores["problems"]["unpaired"] == 1


# --- evaluation -------------------------------------------------------------------------------------------------

def test_evaluate_script_reports_timestamps(decoding_checkpoint, corpus_dir, tmp_path, session_cache_dir):
    """--timestamps adds the "timestamps" key: both sets, scored. This random checkpoint suppresses every special
    token but <|endoftext|>, timestamps included, so none of its outputs can be well formed."""
    from tests.helpers import run_evaluate_script

    code = run_evaluate_script("--model", decoding_checkpoint, "--data.path", corpus_dir, "--data.eval_split", "test",
                               "--data.max_eval_samples=6", f"--data.cache_dir={session_cache_dir}",
                               "--output_dir", tmp_path / "eval", "--timestamps", "--batch_size", "6")
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    single, packed = metrics["timestamps"]["single"], metrics["timestamps"]["packed"]
    assert single["rows"] == 6 and 1 <= packed["rows"] <= 3
    assert single["well_formed_percent"] == 0.0 and sum(single["problems"].values()) >= 6
    assert {"boundary_error_s", "wer", "cer", "segment_count_match_percent"} <= single.keys()


@pytest.mark.slow  # two training runs of 120 steps
def test_training_with_a_timestamp_share_learns_timestamps_and_without_it_does_not(tmp_path, fast_model,
                                                                                   session_cache_dir):
    """The small Whisper memorises 8 clips, packed to its 5-s window, with half the rows timestamped or none:
    decoded with timestamps, the first writes well-formed segments near the speech, the second does not. The
    loop's own evaluation logs the timestamp figures when the share is above 0."""
    from loop.model.features import LogMel
    from loop.model.loading import load_for_inference
    from loop.train import train
    from tests.helpers import reset_accelerate, tensorboard_scalars
    from tests.test_train import memorising_run

    scores = {}
    for fraction in (0.5, 0.0):
        folder = tmp_path / f"share-{fraction}"
        _, config = memorising_run(
            folder, fast_model, session_cache_dir, 8, f"--data.timestamp_fraction={fraction}",
            "--train.per_device_train_batch_size=8", "--train.warmup_steps=10", "--train.max_steps=120",
            "--eval.eval_steps=120", "--train.save_steps=120", "--eval.generation_max_length=64")
        train(config)
        reset_accelerate()
        logged = tensorboard_scalars(folder / "out", "eval/timestamp_single_well_formed_percent")
        assert (set(logged) == {120}) == (fraction > 0)
        model, processor = load_for_inference(str(folder / "out" / "best"))
        from loop.data.splits import build_eval_split

        table, _ = build_eval_split(config, processor, model.config.max_target_positions, split="train")
        scores[fraction] = evaluate_timestamps(model, processor.tokenizer, table, LogMel(processor.feature_extractor),
                                               utterances_per_row=2, language="hi")
    with_share, without = scores[0.5], scores[0.0]
    assert with_share["single"]["well_formed_percent"] >= 75, with_share
    assert with_share["single"]["boundary_error_s"] <= 0.3, with_share
    assert without["single"]["well_formed_percent"] <= 25, without
    assert with_share["packed"]["well_formed_percent"] > without["packed"]["well_formed_percent"], scores
