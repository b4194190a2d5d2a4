"""Preparation: audio, labels and durations; bad rows counted by reason; implausible rows skipped in training
and flagged in evaluation; the `.map` cache; parallel workers; the speaker-disjoint selection slice; build_datasets,
empty training splits, scripts/prepare_data.py and scripts/train.py's error for them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import PROJECT

from loop.config import ConfigError, DataConfig
from loop.config.loading import load_config
from loop.data.prepare import SplitReport, prepare
from loop.data.sources import (
    UTTERANCE_FEATURES,
    DataError,
    SkipLog,
    load_utterances,
    read_common_voice_split,
    write_manifest,
)
from loop.data.splits import build_datasets, build_eval_split, speaker_disjoint_slice
from tests.corpora import add_bad_rows
from tests.helpers import load_script

PREFIX = ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>"]


def listed_durations(corpus_dir) -> dict[str, float]:
    """clip id -> decoded duration in seconds, from the corpus' clip_durations.tsv."""
    lines = (corpus_dir / "clip_durations.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {clip.removesuffix(".mp3"): int(ms) / 1000 for clip, ms in (line.split("\t") for line in lines)}


def quickstart(cache_dir, *overrides, output_dir=None):
    """The quickstart preset (shipped corpus, tiny model) with one preparation process."""
    return load_config("quickstart", [f"--data.cache_dir={cache_dir}", "--data.num_proc=1", *overrides], output_dir)


@pytest.fixture(scope="session")
def prepared_corpus(processor, max_target_positions, session_cache_dir):
    """The whole shipped corpus prepared once for the session, as the quickstart preset does it."""
    return build_datasets(quickstart(session_cache_dir), processor, max_target_positions)


@pytest.fixture
def small_utterances(corpus_copy):
    """The first 16 test rows (row 13 holds quote marks) over copies of their clips, so tests may touch them."""
    folder = corpus_copy(train=1, dev=0, test=16)
    return datasets.Dataset.from_list(read_common_voice_split(folder, "test", SkipLog()), features=UTTERANCE_FEATURES)


def prepare_small(utterances, processor, cache_dir, name="test", **settings):
    report = SplitReport(name)
    table = prepare(utterances, processor.feature_extractor, processor.tokenizer, report, cache_dir=cache_dir,
                    **{"max_duration_s": 30.0, "max_label_length": 256, **settings})
    return table, report


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails instead of hanging forever (the fork/OpenMP deadlock hung preparation with num_proc > 1)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: preparation with worker processes hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the shipped corpus, prepared once -----------------------------------------------------------------------

def test_the_shipped_corpus_prepares_with_nothing_skipped(prepared_corpus):
    reports = prepared_corpus.reports
    for report in reports.values():
        assert dict(report.skips.counts) == {} and report.kept == report.read
    assert reports["train"].kept + reports["selection"].kept == 338  # train 308 + dev 30
    assert reports["test"].kept == len(prepared_corpus.test) == 30
    assert 0 < reports["selection"].kept <= 40 == quickstart("").data.selection_size
    assert prepared_corpus.selection_split == f"dev_slice ({reports['selection'].kept} utterances, speaker-disjoint from training)"
    train_speakers, selection_speakers = set(prepared_corpus.train["client_id"]), set(prepared_corpus.selection["client_id"])
    assert train_speakers and selection_speakers and not train_speakers & selection_speakers
    assert len(train_speakers | selection_speakers) == 8


def test_no_shipped_row_is_implausible_and_the_defaults_leave_room(prepared_corpus):
    """The default limits flag no row of the shipped corpus, and not narrowly: its clips last 1.15-3.84 s and read
    at 7.2-15.4 characters per second, against a 0.5-s minimum and a 0.5-40 range."""
    defaults = DataConfig()
    assert all(report.implausible == 0 for report in prepared_corpus.reports.values())
    for split in ("train", "selection", "test"):
        table = getattr(prepared_corpus, split)
        assert set(table["implausible"]) == {""}
        rates = [len(text) / seconds for text, seconds in zip(table["text"], table["duration"])]
        assert min(table["duration"]) > 2 * defaults.min_duration_s
        assert 10 * defaults.min_chars_per_second < min(rates) and max(rates) < defaults.max_chars_per_second / 2


def test_the_cache_holds_the_decoded_audio_and_durations_are_kept(prepared_corpus, processor, corpus_dir):
    """Audio, not features: each row's int16 samples times its scale are the clip decoded and resampled to 16 kHz
    (to half a step of its scale), as many samples as its duration says; 2 bytes a sample."""
    from loop.data.audio import decode_audio, dequantize

    fe = processor.feature_extractor
    assert (fe.feature_size, fe.nb_max_frames, fe.chunk_length) == (80, 500, 5)  # the tiny model's 5-s window
    table = prepared_corpus.test
    assert table.features["audio"].feature.dtype == "int16" and "input_features" not in table.column_names
    for row in table.with_format("numpy").select(range(4)):
        clip = decode_audio(row["audio_path"])
        restored = dequantize(row["audio"], row["audio_scale"])
        assert len(restored) == len(clip) == round(row["duration"] * 16000)
        assert np.abs(restored - clip).max() <= row["audio_scale"] * (0.5 + 1e-3)
        assert clip.std() > 0.01  # speech, not the empty placeholder of a skipped row
    listed = listed_durations(corpus_dir)
    for split in ("train", "selection", "test"):
        table = getattr(prepared_corpus, split)
        measured = dict(zip(table["id"], table["duration"]))
        assert len(measured) == len(table)
        assert max(abs(seconds - listed[clip]) for clip, seconds in measured.items()) <= 0.001


def test_labels_carry_whisper_prefix_and_decode_to_the_sentence(prepared_corpus, processor, corpus_dir):
    tokenizer = processor.tokenizer
    sentences = [line.split("\t")[3] for line in (corpus_dir / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert prepared_corpus.test["text"] == sentences  # the order of test.tsv, quote marks included
    for labels, sentence in zip(prepared_corpus.test["labels"], sentences):
        tokens = tokenizer.convert_ids_to_tokens(labels)
        assert tokens[:4] == PREFIX and tokens[-1] == "<|endoftext|>"
        assert not any(t.startswith("<|") for t in tokens[4:-1])
        assert tokenizer.decode(labels, skip_special_tokens=True) == sentence


# --- bad rows ------------------------------------------------------------------------------------------------

def test_every_kind_of_bad_row_is_skipped_and_counted(broken_corpus, processor, max_target_positions, tmp_path):
    assert max_target_positions == 256
    wordy_ids = processor.tokenizer(broken_corpus.long_transcript).input_ids
    assert len(wordy_ids) > 256  # the case is what it claims to be
    report = SplitReport("train", skips=SkipLog())
    utterances = load_utterances(DataConfig(path=str(broken_corpus.path)), "train", report.skips)
    report.read = sum(report.skips.counts.values())
    prepared = prepare(utterances, processor.feature_extractor, processor.tokenizer, report, max_duration_s=30,
                       max_label_length=max_target_positions, cache_dir=tmp_path)
    assert dict(report.skips.counts) == broken_corpus.skips == {
        "duplicate_row": 1, "bad_tsv_row": 3, "missing_clip": 1, "empty_audio": 1, "unreadable_audio": 1,
        "too_long": 1, "empty_transcript": 1, "labels_too_long": 1,
    }
    assert len(prepared) == report.kept == broken_corpus.good == 12  # every good row, and only those
    assert report.read == broken_corpus.total == 22
    assert not set(prepared["id"]) & {"missing", "zero", "garbage", "long", "blank", "wordy"}
    clips, line = broken_corpus.path / "clips", broken_corpus.rows
    assert {reason: messages for reason, messages in report.skips.messages.items() if "tsv_row" not in reason
            and reason != "duplicate_row"} == {
        "missing_clip": [f"train.tsv row {line['missing_clip']}: {clips / 'missing.mp3'}: audio file not found"],
        "empty_audio": [f"train.tsv row {line['empty_audio']}: {clips / 'zero.mp3'}: file is empty (0 bytes)"],
        "unreadable_audio": [report.skips.messages["unreadable_audio"][0]],
        "too_long": [f"train.tsv row {line['too_long']}: 12.0 s of audio is over the 5 s limit"],
        "empty_transcript": [f"train.tsv row {line['empty_transcript']}: transcript is empty"],
        "labels_too_long": [f"train.tsv row {line['labels_too_long']}: {len(wordy_ids)} label tokens, "
                            "more than the model's 256"],
    }
    assert report.skips.messages["unreadable_audio"][0].startswith(
        f"train.tsv row {line['unreadable_audio']}: {clips / 'garbage.mp3'}: cannot decode audio")
    assert "labels_too_long 1" in report.summary() and report.summary().startswith("train: 12 of 22 utterances kept")
    json.dumps(report.as_dict())  # written to data_report.json as it is


def test_strict_mode_stops_at_a_bad_clip_with_its_row(corpus_copy, processor, max_target_positions, tmp_path):
    folder = corpus_copy(train=12, dev=0, test=4)
    gone = read_common_voice_split(folder, "train", SkipLog())[6]
    os.remove(gone["audio_path"])  # every row reads fine; the clip is missing only when preparation decodes it
    config = quickstart(tmp_path, f"--data.path={folder}", "--data.strict=true", "--data.selection_size=4")
    with pytest.raises(DataError) as caught:
        build_datasets(config, processor, max_target_positions)
    assert str(caught.value) == (f"train.tsv row 8: {gone['audio_path']}: audio file not found [missing_clip] "
                                 "(data.strict is on; turn it off to skip and count bad rows)")
    lenient = build_datasets(quickstart(tmp_path, f"--data.path={folder}", "--data.selection_size=4"), processor,
                             max_target_positions)
    assert dict(lenient.reports["train"].skips.counts) == {"missing_clip": 1}


# --- implausible rows ---------------------------------------------------------------------------------------

def test_a_truncated_clip_is_skipped_in_training_and_flagged_in_the_test_split(corpus_copy, processor,
                                                                               max_target_positions, tmp_path):
    """A shipped clip cut to 300 bytes (72 ms) under a three-word transcript, in train.tsv and in test.tsv."""
    corpus = add_bad_rows(corpus_copy(train=8, dev=0, test=8), ["implausible_duration"], splits=["train", "test"])
    line = corpus.rows["implausible_duration"]
    why = "0.072 s of audio is under the 0.5 s minimum (data.min_duration_s)"
    data = build_datasets(quickstart(tmp_path, f"--data.path={corpus.path}", "--data.selection_size=2"), processor,
                          max_target_positions)
    train, selection, test = (data.reports[name] for name in ("train", "selection", "test"))
    skipped = train.skips.counts + selection.skips.counts
    assert dict(skipped) == {"implausible_duration": 1} and train.kept + selection.kept == 8
    assert [*train.skips.messages.values(), *selection.skips.messages.values()] == [[f"train.tsv row {line}: {why}"]]
    assert "cut300" not in [*data.train["id"], *data.selection["id"]] and not train.implausible + selection.implausible
    assert (test.read, test.kept, dict(test.skips.counts)) == (9, 9, {})  # kept: the test split is the published one
    flag = f"test.tsv row {line}: {why}"
    assert [(i, f) for i, f in zip(data.test["id"], data.test["implausible"]) if f] == [("cut300", flag)]
    assert (test.implausible, test.implausible_messages) == (1, [flag])
    assert without_cache(test.as_dict()) == {"read": 9, "kept": 9, "skipped": {}, "messages": {}, "implausible": 1,
                                             "implausible_messages": [flag]}
    assert test.summary() == f"test: 9 of 9 utterances kept; skipped: none; flagged as implausible (kept): 1\n    flagged: {flag}"
    table, report = build_eval_split(quickstart(tmp_path, f"--data.path={corpus.path}"), processor,
                                     max_target_positions)  # scripts/evaluate.py's split keeps and flags it too
    assert len(table) == 9 and report.implausible_messages == [flag]


def test_a_transcript_too_fast_or_too_slow_for_its_audio_is_implausible(small_utterances, processor, tmp_path):
    """The rate check: four copies of a 2.4-s clip's sentence (54 characters per second) and a single letter for
    a 2.8-s clip (0.4 per second), both within the label limit."""
    texts = {5: " ".join([small_utterances[5]["text"]] * 4), 3: "क"}
    utterances = small_utterances.map(lambda row, i: {"text": texts.get(i, row["text"])}, with_indices=True)
    limits = {name: getattr(DataConfig(), name) for name in ("min_duration_s", "min_chars_per_second", "max_chars_per_second")}
    trained, report = prepare_small(utterances, processor, tmp_path, **limits)
    assert dict(report.skips.counts) == {"implausible_rate": 2} and len(trained) == report.kept == 14
    messages = dict(zip(("slow", "fast"), report.skips.messages["implausible_rate"]))
    assert messages["slow"] == ("test.tsv row 5: 1 characters in 2.78 s of audio is 0.4 per second, outside 0.5-40 "
                                "(data.min_chars_per_second, data.max_chars_per_second): is the transcript this clip's?")
    assert messages["fast"].startswith(f"test.tsv row 7: {len(texts[5])} characters in 2.42 s of audio is ")
    evaluated, report = prepare_small(utterances, processor, tmp_path, keep_implausible=True, **limits)
    assert len(evaluated) == report.kept == 16 and report.implausible == 2 and not report.skips.counts
    assert [bool(flag) for flag in evaluated["implausible"]] == [i in texts for i in range(16)]
    unchecked, report = prepare_small(utterances, processor, tmp_path)  # prepare()'s own defaults check nothing
    assert len(unchecked) == 16 and not report.implausible


def test_the_plausibility_options_are_checked():
    with pytest.raises(ConfigError) as caught:
        quickstart("", "--data.min_duration_s=-1", "--data.min_chars_per_second=50")
    assert caught.value.problems == [
        "data.min_duration_s must be >= 0, got -1.0",
        "data.min_chars_per_second (50) must be 0 (off) or more and below data.max_chars_per_second (40)",
    ]
    with pytest.raises(ConfigError) as caught:
        quickstart("", "--data.min_duration_s=30")
    assert caught.value.problems == ["data.min_duration_s must be 0 (off) or below data.max_duration_s (30), got 30.0"]
    quickstart("", "--data.min_duration_s=0", "--data.min_chars_per_second=0")  # 0 turns both lower limits off


# --- the cache -----------------------------------------------------------------------------------------------


def without_cache(report: dict) -> dict:
    """A split's report without its cache figures (sizes on disk, checked on their own)."""
    return {key: value for key, value in report.items() if not key.startswith("cache_")}


def cache_files(folder) -> dict[str, tuple[int, int]]:
    """Arrow file name -> (inode, mtime) in a cache folder: a reuse leaves every file as it was, a new preparation
    adds a file (a new fingerprint) or writes one anew (the same one). Completion markers are not listed."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in Path(folder).glob("*.arrow")}


def test_a_second_prepare_reuses_the_cache(small_utterances, processor, tmp_path):
    cache = tmp_path / "cache"
    first, _ = prepare_small(small_utterances, processor, cache)
    files = sorted(cache_files(cache))
    assert len(files) == 1 and files[0].startswith("test-") and files[0].endswith(".arrow")
    written = cache_files(cache)
    second, report = prepare_small(small_utterances, processor, cache)
    assert cache_files(cache) == written  # read from the cache, not prepared again
    assert second["labels"] == first["labels"] and (report.read, report.kept) == (16, 16)
    assert second["audio"] == first["audio"] and second["audio_scale"] == first["audio_scale"]


def test_a_changed_setting_or_clip_prepares_again(small_utterances, processor, tmp_path, corpus_dir):
    cache = tmp_path / "cache"
    prepare_small(small_utterances, processor, cache)
    listed = listed_durations(corpus_dir)
    over = sum(listed[clip] > 2.5 for clip in small_utterances["id"])
    assert 0 < over < 16 and all(abs(listed[clip] - 2.5) > 0.005 for clip in small_utterances["id"])
    shorter, report = prepare_small(small_utterances, processor, cache, max_duration_s=2.5)
    assert dict(report.skips.counts) == {"too_long": over} and len(shorter) == 16 - over
    assert len(cache_files(cache)) == 2
    os.utime(small_utterances[3]["audio_path"], ns=(0, 1_000_000_000))  # a clip replaced since: a new mtime
    again, _ = prepare_small(small_utterances, processor, cache)
    assert len(cache_files(cache)) == 3 and len(again) == 16
    written = cache_files(cache)  # the same inputs once more: from the cache
    assert prepare_small(small_utterances, processor, cache)[0]["labels"] == again["labels"]
    assert cache_files(cache) == written
    prepare_small(small_utterances, processor, cache, max_label_length=255)  # a changed setting: prepared again
    assert len(cache_files(cache)) == 4 and written.items() <= cache_files(cache).items()


def test_two_workers_match_one_and_reuse_their_cache(small_utterances, processor, tmp_path):
    # The serial run goes first on purpose: it starts torch's OpenMP pool in this process before the workers fork.
    serial, _ = prepare_small(small_utterances, processor, tmp_path / "serial")
    with deadline(120):
        parallel, report = prepare_small(small_utterances, processor, tmp_path / "parallel", num_proc=2)
    assert max(cache_files(tmp_path / "parallel")).endswith("_00001_of_00002.arrow")  # two shards: two workers
    assert (report.read, report.kept) == (16, 16) and parallel["id"] == serial["id"]
    assert parallel["labels"] == serial["labels"]
    assert parallel["audio"] == serial["audio"] and parallel["audio_scale"] == serial["audio_scale"]
    written = cache_files(tmp_path / "parallel")
    with deadline(120):
        again, _ = prepare_small(small_utterances, processor, tmp_path / "parallel", num_proc=2)
    assert cache_files(tmp_path / "parallel") == written
    assert again["labels"] == serial["labels"]


# --- the selection slice -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_and_dev(corpus_dir):
    rows = [row for split in ("train", "dev") for row in read_common_voice_split(corpus_dir, split, SkipLog())]
    return datasets.Dataset.from_list(rows, features=UTTERANCE_FEATURES)


@pytest.mark.parametrize("size", [40, 100, 200])
def test_the_selection_slice_is_speaker_disjoint_and_within_size(train_and_dev, size):
    rest, chosen = speaker_disjoint_slice(train_and_dev, size, seed=1)
    speakers = train_and_dev["client_id"]
    assert not {speakers[i] for i in rest} & {speakers[i] for i in chosen}
    assert sorted(rest + chosen) == list(range(338))  # every row in exactly one part
    # Speakers are taken while they fit: one that was passed over did not fit in what was left, and the
    # largest speaker has 50 rows ([37, 38, 38, 39, 42, 45, 49, 50]).
    assert size - 50 < len(chosen) <= size
    assert speaker_disjoint_slice(train_and_dev, size, seed=1) == (rest, chosen)  # seeded: the same again
    other_seeds = {tuple(speaker_disjoint_slice(train_and_dev, size, seed=seed)[1]) for seed in range(2, 6)}
    assert len(other_seeds | {tuple(chosen)}) > 1  # and the seed matters


def test_a_slice_smaller_than_every_speaker_stays_within_size(train_and_dev):
    speakers = train_and_dev["client_id"]
    smallest = min(set(speakers), key=speakers.count)
    rest, chosen = speaker_disjoint_slice(train_and_dev, 10, seed=0)
    assert len(chosen) == 10 and {speakers[i] for i in chosen} == {smallest}
    assert smallest not in {speakers[i] for i in rest}  # its other rows are used by neither part
    assert len(rest) == 338 - speakers.count(smallest) == 301


def test_rows_without_a_speaker_count_as_their_own(train_and_dev):
    table = train_and_dev.select(range(20)).map(lambda row: {"client_id": ""})
    rest, chosen = speaker_disjoint_slice(table, 7, seed=3)
    assert len(chosen) == 7 and len(rest) == 13
    assert speaker_disjoint_slice(table, 0, seed=3) == (list(range(20)), [])


# --- build_datasets and the script ---------------------------------------------------------------------------

def test_sample_limits_and_recipe_mode(processor, max_target_positions, tmp_path):
    data = build_datasets(
        quickstart(tmp_path, "--data.max_train_samples=6", "--data.max_eval_samples=3", "--eval.select_on=test"),
        processor, max_target_positions)
    assert (len(data.train), len(data.selection), len(data.test)) == (6, 3, 3)
    assert data.selection_split == "test (recipe mode: test used for model selection)"
    # one report for the test split, which is also the selection split
    assert data.reports["selection"] is data.reports["test"] and (data.reports["test"].read, data.reports["test"].kept) == (3, 3)
    assert without_cache(data.report_dict()["train"]) == {"read": 6, "kept": 6, "skipped": {}, "messages": {}}
    table, report = build_eval_split(quickstart(tmp_path, "--data.max_eval_samples=5"), processor, max_target_positions, "dev")
    assert len(table) == report.kept == 5 and report.name == "dev"


def test_empty_training_splits_are_named_by_file(corpus_copy, processor, max_target_positions, tmp_path):
    folder = corpus_copy(train=0, dev=0, test=4)
    expected = (f"{folder / 'train.tsv'} and {folder / 'dev.tsv'} hold no usable rows: nothing to train on; point "
                "data.path at a release whose training splits have rows, or name others in data.train_splits")
    with pytest.raises(DataError) as caught:
        build_datasets(quickstart(tmp_path, f"--data.path={folder}"), processor, max_target_positions)
    assert str(caught.value) == expected
    (folder / "train.tsv").write_bytes((folder / "train.tsv").read_bytes() + b"\t".join([b"x"] * 14) + b"\n")
    with pytest.raises(DataError, match=r"/train.tsv holds no usable rows \(skipped while reading: bad_tsv_row 1\)"):
        build_datasets(quickstart(tmp_path, f"--data.path={folder}", "--data.train_splits=train"), processor,
                       max_target_positions)
    write_manifest(tmp_path / "manifests" / "train.csv", [])
    write_manifest(tmp_path / "manifests" / "dev.csv", [])
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'manifests' / 'train.csv'} and "
                                                        f"{tmp_path / 'manifests' / 'dev.csv'} hold no usable rows")):
        build_datasets(quickstart(tmp_path, "--data.source=manifest", f"--data.path={tmp_path / 'manifests'}"),
                       processor, max_target_positions)


def test_train_script_says_the_training_splits_are_empty(corpus_copy, tmp_path, capsys):
    folder = corpus_copy(train=0, dev=0, test=4)
    code = load_script("train").main(["--config", "quickstart", "--data.path", str(folder),
                                      f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_proc=1",
                                      "--train.report_to=none", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {folder / 'train.tsv'} and {folder / 'dev.tsv'} hold no usable rows" in err
    assert "selection_size" not in err


def test_prepare_data_script_on_the_shipped_corpus(prepared_corpus, session_cache_dir, tmp_path, capsys):
    written = cache_files(session_cache_dir)  # the same preset and settings as `prepared_corpus`: all from the cache
    code = load_script("prepare_data").main(["--config", "quickstart", f"--data.cache_dir={session_cache_dir}",
                                             "--data.num_proc", "1", "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and cache_files(session_cache_dir) == written
    kept = {name: report.kept for name, report in prepared_corpus.reports.items()}
    assert out.splitlines()[:3] == [
        f"train: {kept['train']} of {kept['train']} utterances kept; skipped: none",
        f"selection: {kept['selection']} of {kept['selection']} utterances kept; skipped: none",
        "test: 30 of 30 utterances kept; skipped: none",
    ]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert report == prepared_corpus.report_dict()
    assert without_cache(report["test"]) == {"read": 30, "kept": 30, "skipped": {}, "messages": {}}
    # The cache costs about 32 kB per second of audio (int16 at 16 kHz), whatever the window and the mel bins.
    for split in report.values():
        assert 100 < split["cache_mb_per_audio_hour"] / 115.2 * 100 < 110  # 115.2 MB an hour, labels and ids on top
        assert split["cache_bytes_per_row"] < 960_000 / 10  # a tenth of the recipe's 80 x 3000 float32 features


def test_prepare_data_script_reports_bad_rows_and_strict_fails(broken_corpus, tmp_path, capsys):
    script = load_script("prepare_data")
    common = ["--config", "quickstart", f"--data.path={broken_corpus.path}", f"--data.cache_dir={tmp_path / 'cache'}",
              "--data.num_proc=1", "--eval.select_on=test"]
    assert script.main([*common, "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: 12 of 22 utterances kept; skipped: bad_tsv_row 3, duplicate_row 1, empty_audio 1")
    assert out.count("test: 4 of 4 utterances kept") == 1  # selection and test share one report: printed once
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert report["train"]["skipped"] == broken_corpus.skips and report["train"]["kept"] == 12
    assert script.main([*common, "--data.strict=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.strict is on" in err and "train.tsv row" in err


def test_prepare_data_script_exits_2_with_every_config_problem(tmp_path):
    """The real entry point, as a user runs it (a subprocess: the installed package is what it imports)."""
    done = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--config", "quickstart", "--data.path=/nowhere",
         "--train.learning_rate", "-1", "--output", str(tmp_path)],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: invalid configuration:",
        "  - command line: unknown option --output (options look like --section.key=value)",
        "  - data.path '/nowhere' does not exist",
        "  - train.learning_rate must be > 0, got -1.0",
    ]
    assert not (tmp_path / "data_report.json").exists()


def test_a_batched_read_gives_what_row_reads_give(prepared_corpus):
    """`Rows.__getitems__` (one Arrow read per batch, what the DataLoader calls) returns the rows `__getitem__`
    returns, in the loader's order, and they collate to equal batches."""
    import torch

    from loop.data.audio import dequantize
    from loop.data.collator import SpeechSeq2SeqCollator
    from loop.data.loaders import Rows, longest_first

    table = prepared_corpus.test
    rows = Rows(table, longest_first(table))
    collator = SpeechSeq2SeqCollator(decoder_start_token_id=1)
    positions = [4, 0, 7, 2]
    batched, single = rows.__getitems__(positions), [rows[p] for p in positions]
    assert [r["index"] for r in batched] == [r["index"] for r in single] == [rows.order[p] for p in positions]
    one, other = collator(batched), collator(single)
    assert all(torch.equal(one[key], other[key]) for key in one)
    first = next(iter(torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collator)))
    assert first["index"].tolist() == rows.order[:4]
    second = table.with_format("numpy")[rows.order[1]]
    assert torch.equal(first["audio"][1, : len(second["audio"])],
                       torch.from_numpy(dequantize(second["audio"], second["audio_scale"])))


# --- packing consecutive utterances into one window ----------------------------------------------------------

def test_packing_joins_consecutive_utterances_within_the_window(small_utterances, processor, tmp_path):
    """Every usable utterance lands in exactly one packed row, in order; a row's audio is its utterances' audio
    end to end within the window, its labels are its joined transcript's, and the next utterance did not fit."""
    from loop.data.audio import decode_audio, dequantize

    tokenizer = processor.tokenizer
    single, _ = prepare_small(small_utterances, processor, tmp_path)
    packed, report = prepare_small(small_utterances, processor, tmp_path, pack_to_seconds=5.0)
    assert set(single["utterances"]) == {1}
    counts = packed["utterances"]
    assert sum(counts) == report.kept == report.read == len(single) == 16
    assert report.windows == len(packed) < 16 and max(counts) >= 2
    assert report.summary().startswith(f"test: 16 of 16 utterances kept (packed into {len(packed)} windows)")
    assert report.as_dict()["windows"] == len(packed)
    groups, start = [], 0
    for count in counts:
        groups.append(list(range(start, start + count)))
        start += count
    durations, texts, ids = single["duration"], single["text"], single["id"]
    for row, group in zip(packed, groups):
        assert row["text"] == " ".join(texts[i] for i in group)
        assert row["id"] == " + ".join(ids[i] for i in group)
        assert row["labels"] == tokenizer(row["text"]).input_ids
        assert row["duration"] == pytest.approx(sum(durations[i] for i in group), abs=1e-4) and row["duration"] <= 5.0
    for group, following in zip(groups, groups[1:]):  # greedy: the next utterance would have overfilled the window
        assert sum(durations[i] for i in group) + durations[following[0]] > 5.0
    pair = next(g for g in groups if len(g) >= 2)
    audio = np.concatenate([decode_audio(small_utterances[i]["audio_path"]) for i in pair])
    row = packed.with_format("numpy")[groups.index(pair)]
    np.testing.assert_allclose(dequantize(row["audio"], row["audio_scale"]), audio, atol=row["audio_scale"])


def test_packing_respects_the_label_limit_and_tokenizes_each_join_once():
    """A group stops growing when its joined transcript would exceed the label limit, however short the audio;
    a group's labels are those of the tokenization that admitted its last member (no second pass)."""
    from loop.data.audio import SAMPLE_RATE
    from loop.data.rows import Record, pack_groups

    class WordTokenizer:  # one token per word, plus 2 for the prefix and <|endoftext|>; counts its calls
        calls = 0

        def __call__(self, text):
            self.calls += 1
            return type("Encoded", (), {"input_ids": [0, *text.split(), 0]})

    def records(durations, texts):
        return [Record(text=text, origin=f"row {i}", source=None, kept={}, ids=[0, *text.split(), 0],
                       waveform=np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32))
                for i, (seconds, text) in enumerate(zip(durations, texts))]

    def positions(groups, rows):
        return [[rows.index(member) for member in members] for members, _ in groups]

    texts = ["a b", "c", "d e f", "g", "h i"]
    rows, tokenizer = records([1.0] * 5, texts), WordTokenizer()
    groups = pack_groups(rows, tokenizer, 30.0, max_label_length=6)
    assert positions(groups, rows) == [[0, 1], [2, 3], [4]]
    assert [ids for _, ids in groups] == [[0, "a", "b", "c", 0], [0, "d", "e", "f", "g", 0], [0, "h", "i", 0]]
    assert tokenizer.calls == 4  # one per row that tried to join a group, none again for the packed groups
    rows = records([10.0, 25.0, 4.0], [texts[0], texts[2], texts[4]])  # rows 0, 2 and 4 of five
    assert positions(pack_groups(rows, WordTokenizer(), 30.0, 100), rows) == [[0], [1, 2]]


def test_bad_rows_are_counted_and_never_packed(broken_corpus, processor, max_target_positions, tmp_path):
    report = SplitReport("train", skips=SkipLog())
    utterances = load_utterances(DataConfig(path=str(broken_corpus.path)), "train", report.skips)
    report.read = sum(report.skips.counts.values())
    packed = prepare(utterances, processor.feature_extractor, processor.tokenizer, report, max_duration_s=30,
                     max_label_length=max_target_positions, cache_dir=tmp_path, pack_to_seconds=5.0)
    assert dict(report.skips.counts) == broken_corpus.skips
    assert sum(packed["utterances"]) == report.kept == broken_corpus.good == 12 and len(packed) < 12
    assert report.read == broken_corpus.total == 22
    assert not {"missing", "zero", "garbage", "long", "blank", "wordy"} & set(" + ".join(packed["id"]).split(" + "))


def test_only_the_training_rows_are_packed(processor, max_target_positions, tmp_path):
    data = build_datasets(quickstart(tmp_path, "--data.pack_to_seconds=5"), processor, max_target_positions)
    assert sum(data.train["utterances"]) == data.reports["train"].kept > data.reports["train"].windows == len(data.train)
    assert set(data.selection["utterances"]) == set(data.test["utterances"]) == {1}
    assert len(data.test) == 30 and not data.reports["test"].windows
