"""Long-form evaluation (`scripts/evaluate.py --long_form`, loop/eval/long_form.py): recordings joined from hand-made
rows (offsets, references, speaker grouping), the boundary attribution on hand-made alignments, the pipeline's
chunk boundaries against its own chunk iterator, and an end-to-end run on the shipped test split whose figures are
recomputed from the transcripts it wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loop.data.sources import DataError
from loop.eval.long_form import LongFormOptions, build_recordings, chunk_boundaries
from loop.eval.long_form_metrics import boundary_errors, boundary_word_positions, score_long_form
from loop.eval.metrics import compute_metrics, error_rates
from tests.helpers import DECODE_MAX_LENGTH, run_evaluate_script

RATE = 100  # samples per second in the hand-made rows: lengths read as centiseconds


def rows(*spec: tuple[str, str, float]) -> list[dict]:
    """(id, speaker, seconds) -> rows as `build_recordings` takes them; the text names the clip."""
    return [{"id": name, "client_id": speaker, "text": f"{name} says", "samples": round(seconds * RATE)}
            for name, speaker, seconds in spec]


def layout(built) -> list[list[tuple[str, int, int]]]:
    return [[(clip.id, clip.start, clip.end) for clip in recording.clips] for recording in built.recordings]


def test_recordings_keep_a_speaker_together_and_place_every_clip():
    clips = rows(("a1", "A", 4), ("b1", "B", 3), ("a2", "A", 4), ("c1", "", 2), ("b2", "B", 3), ("a3", "A", 4),
                 ("c2", "", 2))
    built = build_recordings(clips, LongFormOptions(min_s=8, max_s=20, gap_s=1), "test", sampling_rate=RATE)
    # A's three clips first (closed at the change to B once past 8 s), then B's with the speakerless clips,
    # which form one group of their own placed where the first of them appears
    assert layout(built) == [[("a1", 0, 400), ("a2", 500, 900), ("a3", 1000, 1400)],
                             [("b1", 0, 300), ("b2", 400, 700), ("c1", 800, 1000), ("c2", 1100, 1300)]]
    first, second = built.recordings
    assert first.samples == 1400 and second.samples == 1300 and built.clips_left_out == 0
    assert first.reference == "a1 says a2 says a3 says" and first.speakers == ["A"]
    assert second.speakers == ["B", ""] and [r.id for r in built.recordings] == ["test-long-0001", "test-long-0002"]
    assert [clip.row for clip in first.clips] == [0, 2, 5]


def test_recordings_stay_within_max_and_a_short_rest_joins_the_last_one():
    clips = rows(*[(f"x{i}", "X", 3) for i in range(7)])
    built = build_recordings(clips, LongFormOptions(min_s=6, max_s=12, gap_s=0), "dev", sampling_rate=RATE)
    assert [len(r.clips) for r in built.recordings] == [4, 3] and built.clips_left_out == 0
    # one clip more: 4 + 4 clips, no rest; two more (a rest of 1 clip that fits nowhere): left out
    built = build_recordings(rows(*[(f"x{i}", "X", 3) for i in range(9)]), LongFormOptions(6, 12, 0), "dev",
                             sampling_rate=RATE)
    assert [len(r.clips) for r in built.recordings] == [4, 4] and built.clips_left_out == 1
    assert all(r.samples <= 12 * RATE for r in built.recordings)


def test_too_few_clips_name_the_split_the_count_the_seconds_and_the_way_out():
    clips = rows(("a", "A", 2.5), ("b", "B", 3))
    with pytest.raises(DataError) as caught:
        build_recordings(clips, LongFormOptions(min_s=60, max_s=300, gap_s=0.5), "test", sampling_rate=RATE)
    message = str(caught.value)
    assert "split 'test' has 2 usable clips, 6.0 s of audio" in message
    assert "--long_form_min_s" in message and "--data.max_eval_samples=0" in message
    with pytest.raises(DataError, match="no room above --long_form_min_s 6 .* at least 9.5"):
        build_recordings(clips * 3, LongFormOptions(min_s=6, max_s=7, gap_s=0.5), "test", sampling_rate=RATE)
    assert LongFormOptions(min_s=30).problems(30.0) == [(
        "--long_form_min_s 30 must be longer than the model's 30-s window (a recording within one window is not "
        "long-form)")]
    assert len(LongFormOptions(min_s=40, max_s=35, gap_s=-1, boundary_words=0).problems(30.0)) == 3


def test_boundary_times_map_to_reference_words_through_the_clip_offsets():
    clips = [(0.0, 4.0, 0, 8), (5.0, 7.0, 8, 2)]  # (start s, end s, first word, words)
    assert boundary_word_positions([1.0, 3.9, 4.5, 5.0, 6.0, 9.0], clips) == [2, 8, 8, 8, 9, 10]


def test_boundary_errors_count_lost_inserted_and_repeated_words_near_boundaries_only():
    reference = [f"w{i}" for i in range(10)]
    # boundary before w5 (zone: w3 to w6): w3 lost, w6 written twice; far from it, w0 lost and "x" inserted
    hypothesis = "w1 w2 w4 w5 w6 w6 w7 w8 x w9"
    counts = boundary_errors(reference, hypothesis, positions=[5], n=2)
    assert counts == {"reference_words": 10, "words_near_boundaries": 4, "lost": 1, "inserted": 1, "repeated": 1,
                      "deleted_elsewhere": 1, "inserted_elsewhere": 1}
    assert boundary_errors(reference, hypothesis, positions=[], n=2)["lost"] == 0
    scores = score_long_form([" ".join(reference)], [["w0 w1 w2 w3 w4", "w5 w6 w7 w8 w9"]], [[(0.0, 5.0), (6.0, 11.0)]],
                             [hypothesis], [[5.5]], "hi", 2)  # 5.5 s: in the silence between the two clips
    assert scores["wer"] == pytest.approx(error_rates([" ".join(reference)], [hypothesis])["wer"])
    assert scores["boundary"]["lost_pct"] == pytest.approx(10.0) and scores["boundary"]["repeated_pct"] == 10.0
    assert scores["boundary"]["near_boundary_rate"] == pytest.approx(50.0)  # 2 errors among 4 words
    assert scores["boundary"]["elsewhere_rate"] == pytest.approx(2 / 6 * 100)


@pytest.mark.parametrize("seconds", [4.0, 10.0, 13.34, 16.67, 21.0, 38.9])
def test_chunk_boundaries_follow_the_pipelines_chunks(seconds, processor):
    from transformers.pipelines.automatic_speech_recognition import chunk_iter

    fe = processor.feature_extractor  # the tiny model's: a 10-s window
    chunk, stride, samples = 160000, 26667, round(seconds * 16000)
    chunks = list(chunk_iter(np.zeros(samples, np.float32), fe, chunk, stride, stride))
    step = chunk - 2 * stride
    assert chunk_boundaries(samples, chunk, stride, stride) == [(k * step + stride) / 16000
                                                                for k in range(1, len(chunks))]


# --- end to end -------------------------------------------------------------------------------------------------

MIN_S, MAX_S = 12, 20  # the decoding checkpoint's window is 5 s: every recording spans 3 windows or more
CLIPS = 20  # of the test split's 30: about 60 s joined


@pytest.fixture(scope="module")
def long_form_run(tmp_path_factory, decoding_checkpoint, corpus_dir, session_cache_dir):
    out = tmp_path_factory.mktemp("long-form")
    code = run_evaluate_script("--model", decoding_checkpoint, "--data.path", corpus_dir, "--data.eval_split", "test",
                               f"--data.max_eval_samples={CLIPS}", f"--data.cache_dir={session_cache_dir}",
                               "--output_dir", out, "--long_form",
                               f"--long_form_min_s={MIN_S}", f"--long_form_max_s={MAX_S}",
                               f"--eval.generation_max_length={DECODE_MAX_LENGTH}", "--batch_size=4")
    assert code == 0
    return out


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_long_form_metrics_are_computed_from_the_written_transcripts(long_form_run):
    metrics = json.loads((long_form_run / "metrics.json").read_text(encoding="utf-8"))
    long_form = metrics["long_form"]
    recordings = read_jsonl(long_form_run / "long_form_predictions.jsonl")
    clips = {row["id"]: row for row in read_jsonl(long_form_run / "predictions.jsonl")}
    assert long_form["recordings"] == len(recordings) >= 3 and long_form["window_s"] == 5.0
    assert long_form["clips"] + long_form["clips_left_out"] == len(clips) == CLIPS
    for recording in recordings:
        assert MIN_S <= recording["seconds"] <= MAX_S
        assert recording["reference"] == " ".join(clips[c["id"]]["reference"] for c in recording["clips"])
        assert recording["clips"][0]["start_s"] == 0 and recording["clips"][-1]["end_s"] == recording["seconds"]
        assert len(recording["sequential_boundaries_s"]) >= 2 and len(recording["chunked_boundaries_s"]) >= 3
    references = [r["reference"] for r in recordings]
    for method in ("sequential", "chunked"):
        hypotheses = [r[method] for r in recordings]
        assert all(hypotheses)
        recomputed = compute_metrics(references, hypotheses, "hi")
        for key, value in recomputed.items():
            assert long_form[method][key] == pytest.approx(value)
        assert long_form[method]["boundary"]["boundaries"] == sum(len(r[f"{method}_boundaries_s"]) for r in recordings)
    assert [r["sequential"] for r in recordings] != [r["chunked"] for r in recordings]
    used = [clips[c["id"]] for r in recordings for c in r["clips"]]
    clip_wer = error_rates([c["reference"] for c in used], [c["hypothesis"] for c in used])["wer"]
    assert long_form["clip_wer"] == pytest.approx(clip_wer)
    report = (long_form_run / "report.md").read_text(encoding="utf-8")
    assert "## Long recordings" in report
    assert f"| WER % | {long_form['sequential']['wer']:.2f} | {long_form['chunked']['wer']:.2f} |" in report


def test_sequential_transcripts_are_the_demos_long_form_decoding(long_form_run, decoding_checkpoint, corpus_dir):
    """The first recording, rebuilt from its clips' files, decodes through `transcribe_long` (the demo's path) to
    the transcript the evaluation wrote."""
    import torch

    from loop.data.audio import as_cached, decode_audio
    from loop.eval.long_form import transcribe_long
    from loop.model.features import LogMel, pad_waveforms
    from loop.model.loading import load_for_inference

    recording = read_jsonl(long_form_run / "long_form_predictions.jsonl")[0]
    waveform = np.zeros(round(recording["seconds"] * 16000), np.float32)
    for clip in recording["clips"]:
        audio = as_cached(decode_audio(corpus_dir / "clips" / f"{clip['id']}.mp3"))
        start = round(clip["start_s"] * 16000)
        waveform[start:start + len(audio)] = audio
    model, processor = load_for_inference(str(decoding_checkpoint), max_length=DECODE_MAX_LENGTH)
    audio, _ = pad_waveforms([waveform])
    windows = []
    text = transcribe_long(model, LogMel(processor.feature_extractor), processor.tokenizer, audio,
                           progress=windows.append)
    assert text == recording["sequential"]
    assert len(windows) == len(recording["sequential_boundaries_s"]) + 1 and windows[0] == 0
    assert torch.tensor(windows).diff().gt(0).all()


def test_a_split_too_short_for_one_recording_exits_2_with_one_line(tmp_path, decoding_checkpoint, corpus_dir,
                                                                    session_cache_dir, capsys):
    code = run_evaluate_script("--model", decoding_checkpoint, "--data.path", corpus_dir, "--data.eval_split", "test",
                               "--data.max_eval_samples=3", f"--data.cache_dir={session_cache_dir}",
                               "--output_dir", tmp_path / "out", "--long_form", f"--eval.generation_max_length={DECODE_MAX_LENGTH}")
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --long_form: split 'test' has 3 usable clips") and "--long_form_min_s" in error
    assert not (tmp_path / "out").exists()
    code = run_evaluate_script("--model", decoding_checkpoint, "--data.path", corpus_dir, "--data.eval_split", "test",
                               "--data.max_eval_samples=3", f"--data.cache_dir={session_cache_dir}",
                               "--output_dir", tmp_path / "out", "--long_form", "--long_form_min_s=4",
                               f"--eval.generation_max_length={DECODE_MAX_LENGTH}")
    assert code == 2
    assert "longer than the model's 5-s window" in capsys.readouterr().err.strip().splitlines()[-1]
