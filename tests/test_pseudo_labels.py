"""scripts/pseudo_label.py: a teacher's transcripts of a split as a manifest the data layer reads back, per-row WER
against the human labels and the WER filter, corrupt clips skipped and counted, unlabelled audio, and a resume
after kill -9 that ends with the same manifest as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time

import pytest

from loop.config import SourceConfig
from loop.data.sources import SkipLog, load_utterances
from tests.helpers import PROJECT, child_env, load_script, script_command

pytestmark = pytest.mark.usefixtures("single_thread")


def manifest_rows(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def run_script(*args) -> int:
    return load_script("pseudo_label").main([str(a) for a in args])


def test_pseudo_labels_skip_a_corrupt_clip_and_filter_by_wer(corpus_copy, decoding_checkpoint):
    """10 rows, one clip overwritten with random bytes: 9 rows pseudo-labelled beside the originals, the corrupt
    one skipped and counted; the manifest reads back as a manifest source; a rerun with --wer_threshold decodes
    nothing again and drops exactly the rows above it."""
    folder = corpus_copy(train=10, dev=0, test=0)
    header, *lines = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()
    corrupt = lines[3].split("\t")[header.split("\t").index("path")]
    (folder / "clips" / corrupt).write_bytes(os.urandom(4000))
    assert run_script("--model", decoding_checkpoint, "--data.path", folder, "--part_rows", 4, "--batch_size", 3) == 0
    report = json.loads((folder / "train_pseudo.report.json").read_text())
    assert (report["read"], report["labelled"], report["kept"], report["compared"]) == (10, 9, 9, 9)
    assert report["skipped"] == {"unreadable_audio": 1} and corrupt in report["skip_messages"]["unreadable_audio"][0]
    assert report["parts_decoded"] == 3 and report["wer"] is not None
    rows = manifest_rows(folder / "train_pseudo.csv")
    assert len(rows) == 9 and not any(corrupt in row["audio"] for row in rows)
    assert len({row["sentence"] for row in rows}) > 1 and all(row["reference"] for row in rows)
    read_back = load_utterances(SourceConfig(source="manifest", path=str(folder)), "train_pseudo", SkipLog())
    assert read_back["text"] == [row["sentence"] for row in rows]

    wers = sorted(float(row["wer"]) for row in rows)
    threshold = wers[4]
    assert run_script("--model", decoding_checkpoint, "--data.path", folder, "--part_rows", 4,
                      "--wer_threshold", threshold) == 0
    report = json.loads((folder / "train_pseudo.report.json").read_text())
    above = sum(w > threshold for w in wers)
    assert above > 0 and report["dropped_by_wer"] == above and report["kept"] == 9 - above
    assert (report["parts_decoded"], report["parts_reused"]) == (0, 3)
    assert all(float(row["wer"]) <= threshold for row in manifest_rows(folder / "train_pseudo.csv"))


def test_unlabelled_audio_gets_pseudo_labels(tmp_path, corpus_copy, decoding_checkpoint):
    """A manifest with an audio column only: every row is labelled, none compared, none dropped by the filter;
    `data.max_train_samples` takes the first rows only."""
    folder = corpus_copy(train=4, dev=0, test=0)
    clips = sorted((folder / "clips").iterdir())
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "unlabelled" / "train.jsonl").write_text("".join(json.dumps({"audio": str(c)}) + "\n" for c in clips))
    assert run_script("--model", decoding_checkpoint, "--data.source=manifest", "--data.path", tmp_path / "unlabelled",
                      "--wer_threshold", 0, "--output_dir", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "train_pseudo.report.json").read_text())
    assert (report["read"], report["kept"], report["compared"], report["dropped_by_wer"]) == (4, 4, 0, 0)
    assert all(row["wer"] == "" and row["reference"] == "" for row in manifest_rows(tmp_path / "out" / "train_pseudo.csv"))
    assert run_script("--model", decoding_checkpoint, "--data.source=manifest", "--data.path", tmp_path / "unlabelled",
                      "--data.max_train_samples=2", "--output_dir", tmp_path / "first-two") == 0
    assert len(manifest_rows(tmp_path / "first-two" / "train_pseudo.csv")) == 2  # a trial on the first rows


@pytest.mark.slow  # three child processes (model load and decoding each): about a minute on 2 busy cores
def test_kill_9_and_resume_gives_the_uninterrupted_manifest(tmp_path, corpus_copy, decoding_checkpoint):
    """A real process killed with SIGKILL once its first part is written, then rerun: it reuses the finished
    parts, decodes the rest, and writes the same manifest as a run that was never interrupted."""
    folder = corpus_copy(train=16, dev=0, test=0)

    def command(out):
        return script_command("pseudo_label", "--model", decoding_checkpoint, "--data.path", folder, "--part_rows", 2,
                              "--batch_size", 2, "--output_dir", out)

    straight = subprocess.run(command(tmp_path / "straight"), env=child_env(), cwd=PROJECT, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    parts = tmp_path / "killed" / ".train_pseudo.parts"
    process = subprocess.Popen(command(tmp_path / "killed"), env=child_env(), cwd=PROJECT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(parts.glob("part-*.jsonl")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    done = len(list(parts.glob("part-*.jsonl")))
    assert 1 <= done < 8, "killed before its first part or after its last"
    assert not (tmp_path / "killed" / "train_pseudo.csv").exists()
    resumed = subprocess.run(command(tmp_path / "killed"), env=child_env(), cwd=PROJECT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((tmp_path / "killed" / "train_pseudo.report.json").read_text())
    assert report["parts_reused"] == done and report["parts_decoded"] == 8 - done
    assert (manifest_rows(tmp_path / "killed" / "train_pseudo.csv")
            == manifest_rows(tmp_path / "straight" / "train_pseudo.csv"))
