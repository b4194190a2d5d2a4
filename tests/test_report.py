"""loop/eval/report.py on hand-made predictions: bucket WERs and error counts checked by hand, the Markdown and HTML."""

from __future__ import annotations

import base64
import re

import datasets
import pytest

from loop.eval.report import (
    audio_element,
    duration_bucket_rates,
    largest_differences,
    mark_errors,
    top_errors,
    utterance_rows,
    write_predictions_jsonl,
    write_report_html,
    write_report_md,
)
from tests.reference import read_predictions_jsonl


def row(index, reference, hypothesis, duration, audio_path=""):
    from loop.eval.metrics import utterance_error_rates

    wer, cer = utterance_error_rates(reference, hypothesis)
    return {"index": index, "id": f"utt{index}", "audio_path": audio_path, "reference": reference,
            "hypothesis": hypothesis, "wer": wer, "cer": cer, "duration": duration}


@pytest.fixture
def rows(corpus_dir):
    clip = str(next((corpus_dir / "clips").glob("*.mp3")))
    return [
        row(0, "मैं घर जा रहा हूँ", "मैं घर जाता रहा हूँ", 1.0, clip),  # 1 substitution of 5 words
        row(1, "राम आया", "राम आया", 1.5),                            # exact
        row(2, "आज बहुत गर्मी है", "आज गर्मी है", 3.0),                 # 1 deletion of 4 words
        row(3, "चलो चलें", "चलो चलें अब घर", 12.0),                     # 2 insertions on 2 words
    ]


SUMMARY = {"model": "runs/x/best", "split": "test", "num_utterances": 4, "num_skipped": 1, "wer": 30.769,
           "cer": 20.0, "normalized_wer": 30.769, "normalized_cer": 19.0, "seconds": 1.5,
           "decoding": {"language": "hi", "task": "transcribe", "num_beams": 1, "max_length": 225}}


def test_duration_buckets_are_corpus_level_and_hand_checked(rows):
    buckets = {b["bucket"]: b for b in duration_bucket_rates(rows)}
    assert list(buckets) == ["< 2 s", "2-5 s", "5-10 s", "10-20 s", "20-30 s"]  # no ">= 30 s": nothing that long
    assert buckets["< 2 s"]["utterances"] == 2
    assert buckets["< 2 s"]["wer"] == pytest.approx(100 * 1 / 7)  # 1 error over 5 + 2 reference words
    assert buckets["2-5 s"]["wer"] == pytest.approx(25.0)
    assert buckets["5-10 s"] == {"bucket": "5-10 s", "utterances": 0, "wer": None}
    assert buckets["10-20 s"]["wer"] == pytest.approx(100.0)
    long = row(4, "एक", "दो", 31.0)
    assert duration_bucket_rates([long])[-1] == {"bucket": ">= 30 s", "utterances": 1, "wer": 100.0}


def test_top_errors_count_each_kind(rows):
    errors = top_errors(rows * 2)
    assert errors["substitutions"] == [(("जा", "जाता"), 2)]
    assert errors["deletions"] == [("बहुत", 2)]
    assert sorted(errors["insertions"]) == [("अब", 2), ("घर", 2)]


def test_largest_differences_orders_by_wer_gap(rows):
    other = [dict(r) for r in rows]
    other[1] = row(1, "राम आया", "श्याम", 1.5)  # 100 points worse
    other[2] = row(2, "आज बहुत गर्मी है", "आज बहुत गर्मी है", 3.0)  # 25 points better
    pairs = largest_differences(rows, other)
    assert [(a["id"], b["wer"] - a["wer"]) for a, b in pairs] == [("utt1", 100.0), ("utt2", -25.0)]


def test_report_md_single_model(tmp_path, rows):
    text = write_report_md(tmp_path / "report.md", SUMMARY, rows).read_text(encoding="utf-8")
    assert text.startswith("# Evaluation: runs/x/best on test")
    assert "| WER % | 30.77 |" in text and "| skipped by data preparation | 1 |" in text
    assert "| < 2 s | 2 | 14.29 |" in text and "| 2-5 s | 1 | 25.00 |" in text and "| 5-10 s | 0 | - |" in text
    assert "| जा | जाता | 1 |" in text and "| बहुत | 1 |" in text and "| अब | 1 |" in text
    assert "differ most" not in text


def test_report_md_compares_two_models(tmp_path, rows):
    other = [dict(r) for r in rows]
    other[1] = row(1, "राम आया", "श्याम | आया", 1.5)
    summary = {**SUMMARY, "compare": {**SUMMARY, "model": "openai/whisper-small", "wer": 45.0}}
    text = write_report_md(tmp_path / "report.md", summary, rows, compare=other).read_text(encoding="utf-8")
    assert "| WER % | 30.77 | 45.00 |" in text
    assert "| duration | utterances | WER % (A) | WER % (B) |" in text
    assert "Most frequent substitutions (A)" in text and "Most frequent substitutions (B)" in text
    differences = text.split("## Where the two models differ most")[1]
    assert "| utt1 | राम आया | राम आया | 0.00 | श्याम \\| आया | 100.00 |" in differences  # pipes escaped
    assert "utt0" not in differences  # same WER for both


def test_predictions_jsonl_round_trip_and_rows_from_a_table(tmp_path):
    table = datasets.Dataset.from_dict({"id": ["a", "b"], "audio_path": ["/x/a.mp3", ""], "duration": [1.25, 2.5],
                                        "text": ["एक दो", "तीन"]})
    predictions = [{"index": 1, "reference": "तीन", "hypothesis": "तीन चार"},
                   {"index": 0, "reference": "एक दो", "hypothesis": "एक दो"}]
    rows = utterance_rows(predictions, table)
    assert [(r["id"], r["wer"], r["duration"]) for r in rows] == [("b", 100.0, 2.5), ("a", 0.0, 1.25)]
    path = write_predictions_jsonl(tmp_path / "p.jsonl", rows)
    assert "तीन चार" in path.read_text(encoding="utf-8")  # readable, not \u escapes
    assert read_predictions_jsonl(path) == rows


def test_mark_errors_styles_each_kind_and_escapes():
    marked = mark_errors("a <b> c", "a <x> c f")
    assert marked == 'a <span class="sub" data-ref="&lt;b&gt;">&lt;x&gt;</span> c <span class="ins">f</span>'
    assert mark_errors("a b", "a") == 'a <span class="del">b</span>'


def test_audio_element_embeds_the_clip_with_its_mime_type(tmp_path, rows):
    clip = rows[0]["audio_path"]
    element = audio_element(clip)
    encoded = re.search(r'src="data:audio/mpeg;base64,([^"]+)"', element).group(1)
    assert base64.b64decode(encoded) == open(clip, "rb").read()
    for suffix, mime in ((".wav", "audio/wav"), (".flac", "audio/flac"), (".ogg", "audio/ogg")):
        path = tmp_path / f"clip{suffix}"
        path.write_bytes(b"RIFF")
        assert f"data:{mime};base64," in audio_element(str(path))
    assert audio_element("") == "" and audio_element(str(tmp_path / "missing.mp3")) == ""


def test_report_html_is_self_contained(tmp_path, rows):
    rows[2]["hypothesis"] = "आज <script>alert(1)</script> है"
    page = write_report_html(tmp_path / "report.html", SUMMARY, rows).read_text(encoding="utf-8")
    assert page.count("<audio controls") == 1  # only the row with an audio_path
    assert "data:audio/mpeg;base64," in page
    assert "<script" not in page and "&lt;script&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    assert '<span class="sub" data-ref="जा">जाता</span>' in page and '<span class="ins">अब</span>' in page
    assert '<html lang="hi">' in page and "<style>" in page


def test_report_html_shows_both_hypotheses_when_comparing(tmp_path, rows):
    other = [dict(r, hypothesis="कुछ और") for r in rows[:3]]  # model B lacks one utterance
    summary = {**SUMMARY, "compare": {**SUMMARY, "model": "b"}}
    page = write_report_html(tmp_path / "report.html", summary, rows, compare=other).read_text(encoding="utf-8")
    assert "hypothesis (B)" in page
    body = page.split("<tbody>")[-1]
    assert body.count("<tr>") == 4 and all(line.count("<td") == 8 for line in body.splitlines() if "<tr>" in line)


def test_report_html_embeds_audio_up_to_its_budget_worst_first(tmp_path, rows):
    """A full test split must not make a page of hundreds of MB: clips are embedded while the budget lasts, the
    highest WER first, and the page says how many."""
    for number, row in enumerate(rows):
        clip = tmp_path / f"clip{number}.mp3"
        clip.write_bytes(bytes(300_000))  # 0.29 MB each
        row["audio_path"] = str(clip)
    rows[1]["wer"], rows[3]["wer"] = 90.0, 80.0
    others = [r for i, r in enumerate(rows) if i not in (1, 3)]
    assert all(r["wer"] < 80.0 for r in others)
    page = write_report_html(tmp_path / "r.html", SUMMARY, rows, max_audio_mb=0.6).read_text(encoding="utf-8")
    assert page.count("<audio controls") == 2
    body = page.split("<tbody>")[-1].split("<tr>")[1:]
    with_audio = [line.split("<br>")[0].removeprefix("<td>") for line in body if "<audio controls" in line]
    assert with_audio == [rows[1]["id"], rows[3]["id"]]  # table order kept; the budget went to the worst two
    assert f"Audio embedded for 2 of {len(rows)} utterances" in page
    none = write_report_html(tmp_path / "none.html", SUMMARY, rows, max_audio_mb=0).read_text(encoding="utf-8")
    assert "<audio controls" not in none and f"Audio embedded for 0 of {len(rows)}" in none
    assert len(none) < 10_000 < len(page)


def test_report_lists_the_hallucinations_worst_first_with_audio(tmp_path, rows):
    looped = row(4, "चलो चलें", "चलो चलें चलें चलें चलें", 2.0, rows[0]["audio_path"])
    empty = row(5, "राम आया", "", 1.0)
    predictions = [*rows, looped, empty]
    report = write_report_md(tmp_path / "report.md", SUMMARY, predictions).read_text(encoding="utf-8")
    section = report.split("## Hallucinations")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| utt")]
    # Loops first; row 3 (two inserted words on two) is "long" only at more than twice its length, so not here.
    assert [line.split(" | ")[0] for line in lines] == ["| utt4", "| utt5"]
    assert "loop, long" in lines[0] and "| चलें |" in lines[0] and "| empty |" in lines[1]
    page = write_report_html(tmp_path / "report.html", SUMMARY, predictions, max_audio_mb=0).read_text(encoding="utf-8")
    worst = page.split("<h2>Hallucinations</h2>")[1].split("</table>")[0]
    assert worst.count("<audio controls") == 1  # the looped row's clip, embedded whatever the page's audio budget
    assert "No hallucination" not in report
    clean = write_report_md(tmp_path / "clean.md", SUMMARY, rows[:2]).read_text(encoding="utf-8")
    assert "## Hallucinations" not in clean
