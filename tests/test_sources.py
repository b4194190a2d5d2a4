"""Sources -> utterance table: the Common Voice reader (shipped corpus, other releases' headers, broken rows),
manifests, and the Hub source up to the network boundary."""

from __future__ import annotations

import csv
import json
import shutil

import datasets
import numpy as np
import pytest
from conftest import SPLIT_SIZES, tsv_lines

from loop.config import DataConfig
from loop.data.audio import decode_audio
from loop.data.sources import (
    UTTERANCE_FEATURES,
    DataError,
    SkipLog,
    find_common_voice_dir,
    find_manifest,
    load_hub_split,
    load_utterances,
    read_common_voice_split,
    split_location,
)

COLUMNS = {"id", "audio_path", "audio_bytes", "text", "client_id", "origin"}


# --- Common Voice: the shipped corpus ---------------------------------------------------------------------------

def test_the_shipped_corpus_reads_with_exact_counts(corpus_dir):
    counts = {}
    for split in SPLIT_SIZES:
        skips = SkipLog(strict=True)  # any bad row would raise
        rows = read_common_voice_split(corpus_dir, split, skips)
        counts[split] = len(rows)
        assert all(set(row) == COLUMNS for row in rows)
        assert all((corpus_dir / "clips" / f"{row['id']}.mp3").is_file() for row in rows)
        assert all(row["text"] and len(row["client_id"]) == 64 for row in rows)
    assert counts == SPLIT_SIZES == {"train": 308, "dev": 30, "test": 30}
    first = read_common_voice_split(corpus_dir, "test", SkipLog())[0]
    header, lines = tsv_lines(corpus_dir, "test")
    fields = lines[0].split("\t")
    assert first == {"id": fields[1].removesuffix(".mp3"), "audio_path": str(corpus_dir / "clips" / fields[1]),
                     "audio_bytes": None, "text": fields[3], "client_id": fields[0], "origin": "test.tsv row 2"}


@pytest.mark.parametrize("where", ["root", "locale"])
def test_the_release_root_and_its_locale_folder_both_work(corpus_root, corpus_dir, where):
    path = corpus_root if where == "root" else corpus_dir
    assert find_common_voice_dir(str(path), "hi") == corpus_dir
    table = load_utterances(DataConfig(path=str(path)), "dev", SkipLog(strict=True))
    assert len(table) == 30 and table.features == UTTERANCE_FEATURES


def test_sentences_with_quote_marks_survive_unchanged(corpus_dir):
    rows = read_common_voice_split(corpus_dir, "train", SkipLog())
    raw = [line.split("\t")[3] for line in tsv_lines(corpus_dir, "train")[1]]
    assert [row["text"] for row in rows] == raw
    quoted = [text for text in raw if '"' in text]
    assert len(quoted) == 8 and all(text.count('"') == 2 for text in quoted)  # e.g. उसने कहा, "मैं ...।"


def test_other_releases_headers_are_picked_by_name(corpus_copy):
    folder = corpus_copy(train=3, dev=0, test=0)
    _, lines = tsv_lines(folder, "train")
    fields = [line.split("\t") for line in lines]  # v17: client_id path sentence_id sentence ...
    # v12 (no sentence_id, sentence_domain, variant), and an old release: `accent`, another column order, no client_id
    (folder / "v12.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
        + "".join(f"{f[0]}\t{f[1]}\t{f[3]}\t2\t0\t\t\t\thi\t\n" for f in fields), encoding="utf-8")
    (folder / "old.tsv").write_text(
        "sentence\tup_votes\tpath\taccent\n" + "".join(f"{f[3]}\t2\t{f[1]}\tindia\n" for f in fields), encoding="utf-8")
    v17 = read_common_voice_split(folder, "train", SkipLog(strict=True))
    v12 = read_common_voice_split(folder, "v12", SkipLog(strict=True))
    old = read_common_voice_split(folder, "old", SkipLog(strict=True))
    assert [r["text"] for r in v12] == [r["text"] for r in old] == [r["text"] for r in v17] == [f[3] for f in fields]
    assert [r["audio_path"] for r in v12] == [r["audio_path"] for r in old] == [r["audio_path"] for r in v17]
    assert [r["client_id"] for r in v12] == [f[0] for f in fields]
    assert [r["client_id"] for r in old] == ["", "", ""]


def test_a_byte_order_mark_does_not_hide_the_first_column(corpus_copy):
    """Saved from a spreadsheet, train.tsv starts with a BOM; `client_id` (first column) must still be found, or
    every row would look like its own speaker and the selection slice would leak speakers into training."""
    folder = corpus_copy(train=4, dev=0, test=0)
    content = (folder / "train.tsv").read_bytes()
    (folder / "train.tsv").write_bytes(b"\xef\xbb\xbf" + content.replace(b"\n", b"\r\n"))  # and Windows line ends
    rows = read_common_voice_split(folder, "train", SkipLog(strict=True))
    assert [len(r["client_id"]) for r in rows] == [64] * 4
    assert not any(r["text"].endswith("\r") for r in rows)


def test_a_missing_required_column_is_one_error_naming_file_and_column(corpus_copy):
    folder = corpus_copy(train=3, dev=0, test=0)
    (folder / "dev.tsv").write_text("client_id\tpath\tup_votes\nabc\tx.mp3\t2\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_common_voice_split(folder, "dev", SkipLog())
    assert str(caught.value) == (f"{folder / 'dev.tsv'}: missing required column(s) sentence "
                                 "(header has: client_id, path, up_votes)")
    with pytest.raises(DataError, match=r"split 'validated' not found \(this folder has: dev, test, train\)"):
        read_common_voice_split(folder, "validated", SkipLog())


def test_wrong_paths_give_one_readable_error(tmp_path, corpus_root, corpus_dir):
    with pytest.raises(DataError) as caught:
        find_common_voice_dir(str(tmp_path / "nowhere"))
    assert str(caught.value) == f"data.path {str(tmp_path / 'nowhere')!r}: no such folder (expected an extracted Common Voice release)"
    with pytest.raises(DataError, match="no folder with train.tsv and clips/ found here or two levels below"):
        find_common_voice_dir(str(tmp_path))
    with pytest.raises(DataError, match="no such folder"):  # a file is not a release
        find_common_voice_dir(str(corpus_dir / "train.tsv"))


def test_several_locales_need_data_locale(tmp_path, corpus_dir):
    for locale in ("hi", "mr"):
        (tmp_path / locale / "clips").mkdir(parents=True)
        shutil.copy(corpus_dir / "train.tsv", tmp_path / locale / "train.tsv")
    assert find_common_voice_dir(str(tmp_path), "mr") == tmp_path / "mr"
    with pytest.raises(DataError, match=r"holds several locales \(hi, mr\); set data.locale"):
        find_common_voice_dir(str(tmp_path), "ta")


# --- Common Voice: a broken copy ----------------------------------------------------------------------------

def test_bad_tsv_rows_are_skipped_and_counted_while_reading(broken_corpus):
    skips = SkipLog()
    rows = read_common_voice_split(broken_corpus.path, "train", skips)
    assert dict(skips.counts) == broken_corpus.read_skips == {"duplicate_row": 1, "bad_tsv_row": 3}
    assert len(rows) == broken_corpus.total - 4 == 18  # 12 good + 6 whose audio or text is bad (found later)
    tsv = broken_corpus.path / "train.tsv"
    line = broken_corpus.rows
    raw = tsv.read_bytes().split(b"\n")
    duplicate = raw[line["duplicate_row"] - 1].decode().split("\t")[1]
    latin1_at = raw[line["bad_tsv_row:invalid_utf8"] - 1].index(b"\xe9")
    assert skips.messages == {
        "bad_tsv_row": [
            f"{tsv} row {line['bad_tsv_row:extra_field']}: 14 fields but the header has 13",
            f"{tsv} row {line['bad_tsv_row:empty_path']}: empty path",
            f"{tsv} row {line['bad_tsv_row:invalid_utf8']}: invalid UTF-8 (invalid continuation byte at byte {latin1_at})",
        ],
        "duplicate_row": [f"{tsv} row {line['duplicate_row']}: clip {duplicate} listed again"],
    }
    assert sum(r["audio_path"].endswith(duplicate) for r in rows) == 1
    # each row keeps its line number for later messages
    assert {r["id"]: r["origin"] for r in rows}["missing"] == f"train.tsv row {line['missing_clip']}"


def test_strict_mode_turns_the_first_bad_row_into_an_error(broken_corpus):
    with pytest.raises(DataError) as caught:
        load_utterances(DataConfig(path=str(broken_corpus.path), strict=True), "train", SkipLog(strict=True))
    first = min(broken_corpus.rows[case] for case in ("duplicate_row", "bad_tsv_row:extra_field"))
    assert f"train.tsv row {first}:" in str(caught.value)
    assert str(caught.value).endswith("[duplicate_row] (data.strict is on; turn it off to skip and count bad rows)")


def test_skip_messages_are_capped_per_reason(corpus_copy):
    folder = corpus_copy(train=1, dev=0, test=0)
    header, lines = tsv_lines(folder, "train")
    (folder / "train.tsv").write_text("\n".join([header, *lines * 30]) + "\n", encoding="utf-8")
    skips = SkipLog()
    assert len(read_common_voice_split(folder, "train", skips)) == 1
    assert skips.counts["duplicate_row"] == 29 and len(skips.messages["duplicate_row"]) == 20


# --- Manifests ------------------------------------------------------------------------------------------------

def write_manifest(folder, suffix, records, columns):
    if suffix == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (folder / f"train.{suffix}").write_text(text, encoding="utf-8")
        return
    with open(folder / f"train.{suffix}", "w", newline="", encoding="utf-8") as handle:
        if suffix == "csv":
            writer = csv.writer(handle)  # quotes fields holding commas or quote marks, as spreadsheets do
        else:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None)
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in records])


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_manifests_with_relative_audio_and_custom_columns(tmp_path, corpus_dir, suffix):
    rows = read_common_voice_split(corpus_dir, "test", SkipLog())[10:14]  # row 12 holds quote marks
    assert any('"' in r["text"] for r in rows) and any("," in r["text"] for r in rows)
    folder = tmp_path / "manifests"
    (folder / "audio").mkdir(parents=True)
    for row in rows:
        shutil.copy(row["audio_path"], folder / "audio" / f"{row['id']}.mp3")
    records = [{"file": f"audio/{r['id']}.mp3", "words": r["text"], "speaker_id": r["client_id"][:8]} for r in rows]
    records[1]["file"] = str(folder / "audio" / f"{rows[1]['id']}.mp3")  # absolute paths are kept as they are
    write_manifest(folder, suffix, records, ["file", "words", "speaker_id"])
    config = DataConfig(source="manifest", path=str(folder), audio_column="file", text_column="words")
    assert find_manifest(str(folder), "train") == folder / f"train.{suffix}"
    table = load_utterances(config, "train", SkipLog(strict=True))
    assert table["text"] == [r["text"] for r in rows]  # commas and quote marks unchanged
    assert table["audio_path"] == [str(folder / "audio" / f"{r['id']}.mp3") for r in rows]
    assert table["client_id"] == [r["client_id"][:8] for r in rows]
    assert table["origin"] == [f"train.{suffix} row {n}" for n in ((1, 2, 3, 4) if suffix == "jsonl" else (2, 3, 4, 5))]


def test_manifest_bad_rows_are_counted(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(
        b'{"audio": "a.wav", "sentence": "one"}\n'
        b'not json\n'
        b'["a list"]\n'
        b'{"audio": "b.wav"}\n'  # no sentence
        b'{"audio": "", "sentence": "no audio"}\n'
        b'{"audio": "a.wav", "sentence": "again"}\n'
        b'{"audio": "c.wav", "sentence": "caf\xe9"}\n'
        b'{"audio": "d.wav", "sentence": "two"}\n')
    skips = SkipLog()
    table = load_utterances(DataConfig(source="manifest", path=str(tmp_path)), "train", skips)
    assert table["text"] == ["one", "two"]
    assert dict(skips.counts) == {"bad_manifest_row": 5, "duplicate_row": 1}
    manifest = tmp_path / "train.jsonl"
    assert skips.messages == {
        "bad_manifest_row": [  # undecodable lines are found first, on the first pass over the bytes
            f"{manifest} row 7: invalid UTF-8 (invalid continuation byte at byte 35)",
            f"{manifest} row 2: not a JSON object (Expecting value: line 1 column 1 (char 0))",
            f"{manifest} row 3: not a JSON object (a JSON array)",
            f"{manifest} row 4: no sentence column (set data.audio_column / data.text_column)",
            f"{manifest} row 5: empty audio",
        ],
        "duplicate_row": [f"{manifest} row 6: a.wav listed again"],
    }


def test_a_manifest_with_a_byte_order_mark(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbfaudio,sentence\r\nx.wav,one\r\n")
    table = load_utterances(DataConfig(source="manifest", path=str(tmp_path)), "train", SkipLog(strict=True))
    assert table["text"] == ["one"] and table["audio_path"] == [str(tmp_path / "x.wav")]


def test_a_missing_manifest_names_what_was_looked_for(tmp_path):
    with pytest.raises(DataError) as caught:
        find_manifest(str(tmp_path), "dev")
    assert str(caught.value) == f"no manifest for split 'dev' in {tmp_path} (expected dev.tsv, dev.csv or dev.jsonl)"


# --- Hub -----------------------------------------------------------------------------------------------------

def test_a_hub_id_offline_gives_one_readable_error():
    config = DataConfig(source="hub", dataset_name="google/fleurs", dataset_config="hi_in")
    with pytest.raises(DataError) as caught:
        load_hub_split(config, "test")
    message = str(caught.value)
    assert message.startswith("cannot load google/fleurs (hi_in) split 'test': ")
    assert "\n" not in message and "Offline" in message


@pytest.fixture
def local_hub_dataset(tmp_path, corpus_dir):
    """A dataset folder as `push_to_hub` writes one: Parquet with the audio bytes inside. The source clips are not
    next to it, so only the embedded bytes can be decoded."""
    rows = read_common_voice_split(corpus_dir, "test", SkipLog())[:3]
    table = datasets.Dataset.from_dict({
        "audio": [{"bytes": open(r["audio_path"], "rb").read(), "path": f"{r['id']}.mp3"} for r in rows],
        "transcription": [r["text"] for r in rows],
        "speaker_id": [r["client_id"] for r in rows],
    }).cast_column("audio", datasets.Audio(sampling_rate=16000))
    folder = tmp_path / "local-dataset"
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder, rows


def test_a_local_dataset_folder_loads_with_audio_bytes(local_hub_dataset):
    folder, rows = local_hub_dataset
    config = DataConfig(source="hub", dataset_name=str(folder), text_column="transcription")
    table = load_hub_split(config, "test")
    assert table.features == UTTERANCE_FEATURES and len(table) == 3
    assert table["text"] == [r["text"] for r in rows] and table["client_id"] == [r["client_id"] for r in rows]
    assert table["id"] == [r["id"] for r in rows] and table["origin"] == ["test row 0", "test row 1", "test row 2"]
    assert table["audio_path"] == [f"{r['id']}.mp3" for r in rows]  # a name only: nothing on disk
    for row, original in zip(table, rows):
        np.testing.assert_array_equal(decode_audio(row["audio_bytes"]), decode_audio(original["audio_path"]))


def test_decoding_audio_columns_in_datasets_needs_torchcodec(local_hub_dataset, corpus_dir):
    """Why load_hub_split casts to Audio(decode=False): datasets 5 decodes Audio columns with torchcodec (and
    FFmpeg), which this project does not install."""
    try:
        import torchcodec  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcodec is installed here")
    folder, _ = local_hub_dataset
    dataset = datasets.load_dataset(str(folder), split="test")
    with pytest.raises(ImportError, match="torchcodec"):
        dataset[0]["audio"]
    undecoded = dataset.cast_column("audio", datasets.Audio(decode=False))[0]["audio"]
    assert undecoded["bytes"] == (corpus_dir / "clips" / undecoded["path"]).read_bytes()


def test_hub_sources_name_missing_columns_and_splits(local_hub_dataset):
    folder, _ = local_hub_dataset
    with pytest.raises(DataError) as caught:
        load_hub_split(DataConfig(source="hub", dataset_name=str(folder)), "test")  # text_column defaults to sentence
    assert str(caught.value) == (f"{folder} split 'test': no column sentence (columns: audio, transcription, "
                                 "speaker_id); set data.audio_column / data.text_column")
    with pytest.raises(DataError, match=r"split 'validation': ValueError: Unknown split \"validation\""):
        load_hub_split(DataConfig(source="hub", dataset_name=str(folder), text_column="transcription"), "validation")


def test_a_script_based_dataset_gets_a_clear_message(tmp_path):
    folder = tmp_path / "old_dataset"
    folder.mkdir()
    (folder / "old_dataset.py").write_text("import datasets\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_hub_split(DataConfig(source="hub", dataset_name=str(folder)), "train")
    assert "it is a script-based dataset, which datasets 5 no longer runs" in str(caught.value)
    assert "--data.dataset_revision=refs/convert/parquet" in str(caught.value)


# --- Where a split comes from, for messages -------------------------------------------------------------------

def test_split_location_names_the_file_or_the_hub_split(corpus_root, corpus_dir, tmp_path):
    assert split_location(DataConfig(path=str(corpus_root)), "dev") == str(corpus_dir / "dev.tsv")
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    assert split_location(DataConfig(source="manifest", path=str(tmp_path)), "train") == str(tmp_path / "train.jsonl")
    hub = DataConfig(source="hub", dataset_name="google/fleurs", dataset_config="hi_in")
    assert split_location(hub, "validation") == "google/fleurs (hi_in) split 'validation'"
