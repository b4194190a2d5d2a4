"""A corpus folder with every kind of bad row: preparation for training and standalone evaluation both finish, all
good rows are used, and each bad row is counted under its reason in the run's output. Also: a Hub token never
reaches anything a run writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import soundfile

from tests.helpers import PROJECT

HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
          "gender", "accents", "variant", "locale", "segment"]
GOOD = 10


def build_bad_corpus(root, corpus_dir):
    """train.tsv and test.tsv, each: 10 good rows of shipped clips and one row of every bad kind."""
    folder = root / "cv-corpus-bad" / "hi"
    clips = folder / "clips"
    clips.mkdir(parents=True)
    lines = (corpus_dir / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    good = [line.split("\t") for line in lines[:GOOD]]
    for fields in good:
        shutil.copy(corpus_dir / "clips" / fields[1], clips / fields[1])
    sample = good[0]
    # kept: a truncated MP3 still holds whole frames (soundfile decodes them), an 8 kHz stereo WAV is resampled
    (clips / "truncated.mp3").write_bytes((corpus_dir / "clips" / good[1][1]).read_bytes()[:3000])
    t = np.arange(8000 * 2) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(clips / "stereo8k.wav", np.stack([tone, tone], axis=1), 8000)
    (clips / "zero.mp3").write_bytes(b"")
    soundfile.write(clips / "long45.wav", np.zeros(16000 * 45, dtype=np.float32) + 0.01, 16000)
    shutil.copy(corpus_dir / "clips" / good[2][1], clips / "longtext.mp3")
    shutil.copy(corpus_dir / "clips" / good[3][1], clips / "nosentence.mp3")

    def row(clip, sentence):
        fields = list(sample)
        fields[1], fields[3] = clip, sentence
        return "\t".join(fields).encode()

    bad = [
        row("truncated.mp3", "कटी हुई फ़ाइल।"),  # kept
        row("stereo8k.wav", "दो चैनल की आवाज़।"),  # kept
        row("zero.mp3", "खाली फ़ाइल।"),  # empty_audio
        row("long45.wav", "पैंतालीस सेकंड।"),  # too_long
        row("longtext.mp3", "बहुत " * 400),  # 2,000 characters: labels_too_long
        row("latin1.mp3", "x").replace(b"x", b"caf\xe9"),  # invalid UTF-8: bad_tsv_row
        "\t".join(good[4]).encode(),  # duplicate row: duplicate_row
        row("missing.mp3", "यह फ़ाइल नहीं है।"),  # missing_clip
        ("\t".join(good[5][:1] + ["extra.mp3"] + good[5][2:] + ["extra", "columns"])).encode(),  # bad_tsv_row
        "\t".join(sample[:1] + ["nosentence.mp3"]).encode(),  # missing columns: no sentence -> empty_transcript
    ]
    body = b"\n".join(["\t".join(HEADER).encode(), *["\t".join(f).encode() for f in good], *bad]) + b"\n"
    for split in ("train", "test"):
        (folder / f"{split}.tsv").write_bytes(body)
    (folder / "dev.tsv").write_text("\t".join(HEADER) + "\n", encoding="utf-8")
    return folder.parent


EXPECTED_SKIPS = {"empty_audio": 1, "too_long": 1, "labels_too_long": 1, "bad_tsv_row": 2, "duplicate_row": 1,
                  "missing_clip": 1, "empty_transcript": 1}
EXPECTED_KEPT = GOOD + 2  # the good rows, the truncated MP3 and the 8 kHz stereo WAV


def run(*args, env=None):
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True, text=True, timeout=600,
                          env=environment)


def test_preparation_and_evaluation_finish_and_count_every_bad_row(tmp_path, corpus_dir, tiny_model_dir):
    corpus = build_bad_corpus(tmp_path, corpus_dir)
    common = [f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_proc=1"]
    prepared = run("scripts/prepare_data.py", "--config", "quickstart", "--output_dir", str(tmp_path / "prep"),
                   *common, "--data.train_splits=train", "--data.selection_size=1")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report = json.loads((tmp_path / "prep" / "data_report.json").read_text())
    train_and_selection = {}
    for part in ("train", "selection"):
        for reason, count in report[part]["skipped"].items():
            train_and_selection[reason] = train_and_selection.get(reason, 0) + count
    assert train_and_selection == EXPECTED_SKIPS
    assert report["train"]["kept"] + report["selection"]["kept"] == EXPECTED_KEPT
    assert report["test"]["skipped"] == EXPECTED_SKIPS and report["test"]["kept"] == EXPECTED_KEPT
    assert "missing.mp3: audio file not found" in prepared.stdout

    evaluated = run("scripts/evaluate.py", "--config", "quickstart", "--model", str(tiny_model_dir),
                    "--data.eval_split=test", "--output_dir", str(tmp_path / "eval"), *common,
                    "--eval.generation_max_length=8")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_utterances"] == EXPECTED_KEPT
    assert metrics["num_skipped"] == sum(EXPECTED_SKIPS.values())
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == EXPECTED_KEPT


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
