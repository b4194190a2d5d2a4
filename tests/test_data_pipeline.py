"""Data pipeline: Common Voice reader, bad input with exact skip counts, audio decoding and resampling, features
and labels, the prepared-data cache, manifests, the Hub source up to the network boundary, configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import soundfile

import loop.data
from loop.audio import SAMPLE_RATE, AudioError, decode_audio
from loop.config import ConfigError, DataConfig, list_presets, load_config
from loop.data import SplitReport, prepare, speaker_disjoint_slice
from loop.sources import DataError, SkipLog, find_common_voice_dir, load_hub_split, load_utterances, read_common_voice_split

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V17_HEADER = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"


def tsv_rows(corpus_dir, split):
    lines = (corpus_dir / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    return lines[0], lines[1:]


def test_reads_the_shipped_corpus_from_root_or_locale_folder(corpus_dir):
    assert find_common_voice_dir(str(corpus_dir.parent)) == corpus_dir
    assert find_common_voice_dir(str(corpus_dir)) == corpus_dir
    counts = {split: len(read_common_voice_split(corpus_dir, split, SkipLog(strict=True))) for split in ("train", "dev", "test")}
    assert counts == {"train": 308, "dev": 30, "test": 30}
    rows = read_common_voice_split(corpus_dir, "train", SkipLog())
    assert set(rows[0]) == {"id", "audio_path", "audio_bytes", "text", "client_id", "origin"}
    assert all(os.path.isfile(row["audio_path"]) for row in rows)
    quoted = [row["text"] for row in rows if '"' in row["text"]]
    raw = [line.split("\t")[3] for line in tsv_rows(corpus_dir, "train")[1] if '"' in line]
    assert quoted and quoted == raw  # quote marks survive: no quote handling


def test_other_releases_headers_are_picked_by_name(tmp_path, corpus_dir):
    _, rows = tsv_rows(corpus_dir, "test")
    fields = [row.split("\t") for row in rows[:3]]
    folder = tmp_path / "hi"
    (folder / "clips").mkdir(parents=True)
    for f in fields:
        shutil.copy(corpus_dir / "clips" / f[1], folder / "clips" / f[1])
    # v12: no sentence_id, sentence_domain, variant; old releases: `accent`, columns in another order.
    (folder / "train.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
        + "".join(f"{f[0]}\t{f[1]}\t{f[3]}\t2\t0\t\t\t\thi\t\n" for f in fields), encoding="utf-8")
    (folder / "test.tsv").write_text(
        "sentence\tpath\taccent\n" + "".join(f"{f[3]}\t{f[1]}\t\n" for f in fields), encoding="utf-8")
    v12 = read_common_voice_split(folder, "train", SkipLog(strict=True))
    old = read_common_voice_split(folder, "test", SkipLog(strict=True))
    assert [r["text"] for r in v12] == [r["text"] for r in old] == [f[3] for f in fields]
    assert [r["client_id"] for r in v12] == [f[0] for f in fields] and old[0]["client_id"] == ""
    (folder / "dev.tsv").write_text("client_id\tpath\tup_votes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.tsv: missing required column\(s\) sentence"):
        read_common_voice_split(folder, "dev", SkipLog())


def test_wrong_paths_give_one_readable_error(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        find_common_voice_dir(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no folder with train.tsv and clips/"):
        find_common_voice_dir(str(tmp_path))


def write_tone(path, seconds, rate, channels=1, frequency=1000.0, **kwargs):
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * frequency * t).astype(np.float32)
    soundfile.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate, **kwargs)


@pytest.fixture
def broken_corpus(tmp_path, corpus_dir):
    """A copy of 12 good test clips plus one of each kind of bad row."""
    header, rows = tsv_rows(corpus_dir, "test")
    folder = tmp_path / "cv" / "hi"
    (folder / "clips").mkdir(parents=True)
    good = rows[:12]
    for row in good:
        clip = row.split("\t")[1]
        shutil.copy(corpus_dir / "clips" / clip, folder / "clips" / clip)
    template = good[0].split("\t")

    def row_for(clip, sentence):
        fields = list(template)
        fields[1], fields[3] = clip, sentence
        return "\t".join(fields)

    (folder / "clips" / "zero.mp3").write_bytes(b"")
    (folder / "clips" / "garbage.mp3").write_bytes(os.urandom(4000))
    write_tone(folder / "clips" / "long.wav", 12.0, 8000)  # over the tiny model's 5-s window
    bad = [
        row_for("missing.mp3", "यह फ़ाइल नहीं है।").encode(),
        row_for("zero.mp3", "खाली फ़ाइल।").encode(),
        row_for("garbage.mp3", "टूटी फ़ाइल।").encode(),
        row_for("long.wav", "बहुत लंबी आवाज़।").encode(),
        row_for("blank.mp3", "   ").encode(),  # a transcript that is empty after stripping
        row_for("labels.mp3", "क" * 400).encode(),  # more label tokens than the model's 128/256
        good[2].encode(),  # duplicate of a good row
        "\t".join(template + ["extra"]).encode(),  # one field too many
        row_for("latin1.mp3", "x").encode().replace(b"x", b"caf\xe9"),  # invalid UTF-8
    ]
    shutil.copy(corpus_dir / "clips" / good[3].split("\t")[1], folder / "clips" / "labels.mp3")
    shutil.copy(corpus_dir / "clips" / good[4].split("\t")[1], folder / "clips" / "blank.mp3")
    body = b"\n".join([header.encode(), *[r.encode() for r in good], *bad]) + b"\n"
    (folder / "test.tsv").write_bytes(body)
    (folder / "train.tsv").write_text(header + "\n", encoding="utf-8")
    return folder


def test_bad_rows_are_skipped_and_counted_by_reason(broken_corpus, processor, tmp_path):
    config = DataConfig(path=str(broken_corpus), cache_dir=str(tmp_path / "cache"))
    report = SplitReport("test", skips=SkipLog())
    utterances = load_utterances(config, "test", report.skips)
    assert dict(report.skips.counts) == {"duplicate_row": 1, "bad_tsv_row": 2}
    report.read = sum(report.skips.counts.values())
    max_labels = 128
    prepared = prepare(utterances, processor.feature_extractor, processor.tokenizer, report,
                       max_duration_s=30, max_label_length=max_labels, cache_dir=tmp_path / "cache")
    assert dict(report.skips.counts) == {
        "duplicate_row": 1, "bad_tsv_row": 2, "missing_clip": 1, "empty_audio": 1, "unreadable_audio": 1,
        "too_long": 1, "empty_transcript": 1, "labels_too_long": 1,
    }
    assert len(prepared) == report.kept == 12  # every good row
    assert report.read == 21
    messages = " ".join(m for ms in report.skips.messages.values() for m in ms)
    assert "missing.mp3: audio file not found" in messages and "test.tsv row" in messages
    assert "invalid UTF-8" in messages and "14 fields but the header has 13" in messages
    assert "12.0 s of audio is over the 5 s limit" in messages
    (tmp_path / "report.json").write_text(json.dumps(report.as_dict()))  # serialisable as written to the run


def test_strict_mode_stops_at_the_first_bad_row(broken_corpus):
    with pytest.raises(DataError, match="data.strict is on"):
        load_utterances(DataConfig(path=str(broken_corpus), strict=True), "test", SkipLog(strict=True))


@pytest.mark.parametrize("rate", [48000, 44100, 8000])
def test_resampling_keeps_a_1khz_tone_and_its_duration(tmp_path, rate):
    path = tmp_path / f"tone{rate}.wav"
    write_tone(path, 2.0, rate, channels=2)
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - 2.0) <= 0.001
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(audio)
    assert abs(peak_hz - 1000.0) <= 1.0


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg", "mp3"])
def test_common_formats_decode(tmp_path, suffix):
    path = tmp_path / f"tone.{suffix}"
    write_tone(path, 1.0, 48000)
    audio = decode_audio(path)
    assert abs(len(audio) - SAMPLE_RATE) < 0.05 * SAMPLE_RATE  # MP3 adds encoder padding
    assert 0.2 < np.sqrt(np.mean(audio**2)) < 0.5


def test_decode_errors_carry_a_reason(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError) as error:
        decode_audio(tmp_path / "empty.wav")
    assert error.value.reason == "empty_audio"
    with pytest.raises(AudioError) as error:
        decode_audio(b"not audio at all")
    assert error.value.reason == "unreadable_audio"


@pytest.fixture
def small_utterances(corpus_dir):
    rows = read_common_voice_split(corpus_dir, "test", SkipLog())[:8]
    return datasets.Dataset.from_list(rows, features=loop.sources.UTTERANCE_FEATURES)


def test_features_labels_and_durations(small_utterances, processor, tmp_path):
    report = SplitReport("test")
    prepared = prepare(small_utterances, processor.feature_extractor, processor.tokenizer, report,
                       max_duration_s=30, max_label_length=256, cache_dir=tmp_path)
    row = prepared.with_format("numpy")[0]
    assert row["input_features"].shape == (80, 500) and row["input_features"].dtype == np.float32
    assert 1.0 < row["duration"] < 4.0
    tokens = processor.tokenizer.convert_ids_to_tokens(prepared[0]["labels"])
    assert tokens[:4] == ["<|startoftranscript|>", "<|hi|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tokens[-1] == "<|endoftext|>"
    assert processor.tokenizer.decode(prepared[0]["labels"], skip_special_tokens=True) == small_utterances[0]["text"]


def test_prepared_data_is_reused_from_the_cache(small_utterances, processor, tmp_path, monkeypatch):
    def prepared():
        return prepare(small_utterances, processor.feature_extractor, processor.tokenizer, SplitReport("test"),
                       max_duration_s=30, max_label_length=256, cache_dir=tmp_path)

    first = prepared()
    files = sorted(os.listdir(tmp_path))

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds this data")

    monkeypatch.setattr(loop.data, "_prepare_batch", must_not_run)
    second = prepared()
    assert sorted(os.listdir(tmp_path)) == files
    assert second["labels"] == first["labels"]
    os.utime(small_utterances[0]["audio_path"])  # a changed clip invalidates the cache
    with pytest.raises(AssertionError, match="recomputed"):
        prepared()


def test_parallel_preparation_matches_serial(small_utterances, processor, tmp_path):
    common = dict(max_duration_s=30, max_label_length=256)
    serial = prepare(small_utterances, processor.feature_extractor, processor.tokenizer, SplitReport("a"),
                     cache_dir=tmp_path / "1", **common)
    parallel = prepare(small_utterances, processor.feature_extractor, processor.tokenizer, SplitReport("b"),
                       cache_dir=tmp_path / "2", num_proc=2, **common)
    assert parallel["labels"] == serial["labels"]
    np.testing.assert_allclose(parallel.with_format("numpy")["input_features"],
                               serial.with_format("numpy")["input_features"], atol=1e-6)


def test_speaker_disjoint_slice(corpus_dir):
    rows = read_common_voice_split(corpus_dir, "train", SkipLog())
    table = datasets.Dataset.from_list(rows, features=loop.sources.UTTERANCE_FEATURES)
    rest, chosen = speaker_disjoint_slice(table, 80, seed=1)
    assert 0 < len(chosen) <= 80 and len(rest) + len(chosen) == len(rows)
    speakers = table["client_id"]
    assert not {speakers[i] for i in rest} & {speakers[i] for i in chosen}
    assert speaker_disjoint_slice(table, 80, seed=1) == (rest, chosen)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_manifest_sources(tmp_path, corpus_dir, suffix):
    rows = read_common_voice_split(corpus_dir, "test", SkipLog())[:3]
    folder = tmp_path / "manifests"
    (folder / "audio").mkdir(parents=True)
    for row in rows:
        shutil.copy(row["audio_path"], folder / "audio" / os.path.basename(row["audio_path"]))
    records = [{"file": f"audio/{os.path.basename(r['audio_path'])}", "words": r["text"]} for r in rows]
    if suffix == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        sep = "," if suffix == "csv" else "\t"
        text = f"file{sep}words\n" + "".join(f"{r['file']}{sep}{r['words']}\n" for r in records)
    (folder / f"train.{suffix}").write_text(text, encoding="utf-8")
    config = DataConfig(source="manifest", path=str(folder), audio_column="file", text_column="words")
    table = load_utterances(config, "train", SkipLog(strict=True))
    assert table["text"] == [r["text"] for r in rows]
    assert all(os.path.isfile(p) for p in table["audio_path"])


def test_hub_dataset_offline_gives_one_readable_error():
    config = DataConfig(source="hub", dataset_name="google/fleurs", dataset_config="hi_in")
    with pytest.raises(DataError, match=r"cannot load google/fleurs \(hi_in\) split 'test'"):
        load_hub_split(config, "test")


def test_hub_style_dataset_with_audio_bytes(tmp_path, corpus_dir):
    rows = read_common_voice_split(corpus_dir, "test", SkipLog())[:3]
    table = datasets.Dataset.from_dict({"audio": [r["audio_path"] for r in rows],
                                        "transcription": [r["text"] for r in rows]})
    table = table.cast_column("audio", datasets.Audio(decode=False))
    folder = tmp_path / "local_dataset" / "data"
    folder.mkdir(parents=True)
    table.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    config = DataConfig(source="hub", dataset_name=str(tmp_path / "local_dataset"), text_column="transcription")
    utterances = load_hub_split(config, "test")
    assert utterances["text"] == [r["text"] for r in rows]
    audio = decode_audio(utterances[0]["audio_bytes"] or utterances[0]["audio_path"])
    assert np.allclose(audio, decode_audio(rows[0]["audio_path"]))


def test_config_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", ["--train.learning_rate=-1", "--train.per_device_train_batch_size=0",
                                   "--eval.eval_steps=5000", "--train.learnig_rate=1", "--model.language=klingon",
                                   f"--model.name_or_path={tmp_path / 'no-model'}"])
    problems = error.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "train.learning_rate must be > 0" in text and "per_device_train_batch_size must be >= 1" in text
    assert "eval.eval_steps (5000) is larger than train.max_steps" in text
    assert "did you mean train.learning_rate" in text and "'klingon' is not a Whisper language" in text
    assert "no-model" in text and "does not exist" in text


def test_override_forms_and_order(tmp_path):
    config = load_config("quickstart", ["--train.max_steps", "50", "--eval.eval_steps=25", "--data.train_splits=train"],
                         str(tmp_path))
    assert config.train.max_steps == 50 and config.eval.eval_steps == 25 and config.data.train_splits == ["train"]
    assert config.train.learning_rate == 2e-3  # from the preset, over the default 1e-5
    assert config.output_dir == str(tmp_path)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset, corpus_dir):
    config = load_config(preset, [f"--data.path={corpus_dir.parent}"])
    assert config.model.language == "hindi"
    if preset == "whisper-small-hi":
        assert (config.model.name_or_path, config.train.learning_rate, config.train.max_steps) == ("openai/whisper-small", 1e-5, 4000)
        assert (config.train.warmup_steps, config.train.per_device_train_batch_size, config.eval.eval_steps) == (500, 16, 1000)
        assert (config.eval.generation_max_length, config.train.mixed_precision) == (225, "fp16")


def test_prepare_data_script(tmp_path):
    done = subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", "quickstart", "--output_dir",
                           str(tmp_path), f"--data.cache_dir={tmp_path / 'cache'}", "--data.max_train_samples=8",
                           "--data.max_eval_samples=4", "--data.num_proc=1"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train: 8 of 8 utterances kept" in done.stdout
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["kept"] == 8 and report["test"]["kept"] == 4
    bad = subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", "quickstart", "--data.path=/nowhere"],
                         cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.path '/nowhere' does not exist" in bad.stderr
