"""A corpus folder with every kind of bad row: preparation for training and standalone evaluation both finish, all
good rows are used, and each bad row is counted under its reason in the run's output; the implausible one (72 ms of
audio) is skipped in training and kept, flagged, in every output of evaluation. Also: a Hub token never reaches
anything a run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.corpora import add_bad_rows
from tests.helpers import PROJECT

CASES = ("kept:truncated_mp3", "kept:stereo_8k", "empty_audio", "too_long", "labels_too_long",
         "bad_tsv_row:invalid_utf8", "duplicate_row", "missing_clip", "bad_tsv_row:extra_field",
         "empty_transcript:no_sentence_field", "implausible_duration")
GOOD = 10
EXPECTED_SKIPS = {"empty_audio": 1, "too_long": 1, "labels_too_long": 1, "bad_tsv_row": 2, "duplicate_row": 1,
                  "missing_clip": 1, "empty_transcript": 1}
TRAINING_SKIPS = {**EXPECTED_SKIPS, "implausible_duration": 1}  # the 72-ms clip: skipped in training, flagged in test
EXPECTED_KEPT = GOOD + 2  # the good rows, the truncated MP3 and the 8 kHz stereo WAV


def build_bad_corpus(corpus_copy):
    """train.tsv and test.tsv, each: 10 good rows of shipped clips and one row of each case (tests/corpora.py)."""
    corpus = add_bad_rows(corpus_copy(train=GOOD, dev=0, test=GOOD), CASES, splits=["train", "test"])
    assert (corpus.skips, corpus.eval_skips, corpus.flagged) == (TRAINING_SKIPS, EXPECTED_SKIPS, 1)
    return corpus


def run(*args, env=None):
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True, text=True, timeout=600,
                          env=environment)


def test_preparation_and_evaluation_finish_and_count_every_bad_row(tmp_path, corpus_copy, tiny_model_dir):
    corpus = build_bad_corpus(corpus_copy)
    common = [f"--data.path={corpus.path}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_proc=1"]
    prepared = run("scripts/prepare_data.py", "--config", "quickstart", "--output_dir", str(tmp_path / "prep"),
                   *common, "--data.train_splits=train", "--data.selection_size=1")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report = json.loads((tmp_path / "prep" / "data_report.json").read_text())
    train_and_selection = {}
    for part in ("train", "selection"):
        for reason, count in report[part]["skipped"].items():
            train_and_selection[reason] = train_and_selection.get(reason, 0) + count
    assert train_and_selection == TRAINING_SKIPS
    assert report["train"]["kept"] + report["selection"]["kept"] == EXPECTED_KEPT
    assert report["test"]["skipped"] == EXPECTED_SKIPS and report["test"]["kept"] == EXPECTED_KEPT + 1
    flag = (f"test.tsv row {corpus.rows['implausible_duration']}: 0.072 s of audio is under the 0.5 s minimum "
            "(data.min_duration_s)")
    assert report["test"]["implausible"] == 1 and report["test"]["implausible_messages"] == [flag]
    assert "missing.mp3: audio file not found" in prepared.stdout
    assert "flagged as implausible (kept): 1" in prepared.stdout and f"flagged: {flag}" in prepared.stdout

    evaluated = run("scripts/evaluate.py", "--config", "quickstart", "--model", str(tiny_model_dir),
                    "--data.eval_split=test", "--output_dir", str(tmp_path / "eval"), *common,
                    "--eval.generation_max_length=8")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_utterances"] == EXPECTED_KEPT + 1  # the implausible row is evaluated, flagged
    assert metrics["num_skipped"] == sum(EXPECTED_SKIPS.values())
    assert metrics["num_implausible"] == 1 and metrics["implausible_messages"] == [flag]
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == EXPECTED_KEPT + 1
    flagged = [row for row in map(json.loads, predictions) if row["implausible"]]
    assert [(row["id"], row["implausible"]) for row in flagged] == [("cut300", flag)]
    report_md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| flagged as implausible (kept) | 1 |" in report_md and "## Flagged as implausible" in report_md
    assert "| cut300 | 0.07 |" in report_md
    assert "1 flagged as implausible" in evaluated.stdout


def test_a_hub_token_is_never_written(tmp_path, tiny_model_dir):
    secret = "hf_" + "Z" * 34
    out = tmp_path / "run"
    done = run("scripts/train.py", "--config", "quickstart", "--output_dir", str(out),
               f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_proc=1", "--data.max_train_samples=8",
               "--data.max_eval_samples=2", "--train.max_steps=1", "--eval.eval_steps=1", "--train.warmup_steps=0",
               "--eval.generation_max_length=8", "--train.per_device_train_batch_size=4",
               env={"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret})
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in written) and any("tfevents" in p.name for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    source = "".join(p.read_text() for p in (PROJECT / "loop").glob("*.py"))
    assert "trust_remote_code=True" not in source and "torch.load(" not in source
