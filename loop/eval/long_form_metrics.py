"""Scores of long-form transcripts: the error rates of `loop.eval.metrics` over the joined references, and the words
lost or repeated at window boundaries, with the report.md section that shows them.

Window boundaries. A decoding cuts a recording into windows; a boundary is the time where one window's part of
the transcript ends and the next one's begins: for sequential decoding the start of every window after the first
(where the model's last timestamp moved it), for the pipeline's chunked decoding the middle of each overlap of two
consecutive chunks, where their transcripts are stitched.

From time to reference position. Each clip's offsets in the recording are known, and so is where its words
start in the joined reference. A boundary inside a clip is placed among that clip's words in proportion to the
time elapsed in it (its words taken as evenly spread: about one word off at worst); a boundary in the silence
between clips is placed exactly between their words. Position b means "before reference word b".

Attribution. Hypothesis and reference, both normalized (`loop.eval.metrics.normalizer_for`), are aligned word by word
with jiwer. A deletion of reference word j is *lost at a boundary* when b - N <= j < b + N for some boundary b (N
words on each side, `boundary_words`); an insertion sitting before reference word i (after the i first reference
words) is *inserted at a boundary* when |i - b| <= N, and *repeated* when the inserted word is one of the
reference words within N words of where it sits (a word said once and written twice, as stitching and window
overlaps do). The shares are percentages of all reference words, so they are the part of the WER that the
boundaries cost (at most: a boundary zone has its ordinary errors too). For comparison, the deletion-plus-insertion
rate inside the boundary zones and outside them: `near_boundary_rate` and `elsewhere_rate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from loop.eval.metrics import aligned_ops, compute_metrics, normalizer_for

RATE_KEYS = ("wer", "cer", "normalized_wer", "normalized_cer")


def boundary_word_positions(boundaries_s: Sequence[float], clips: Sequence[tuple[float, float, int, int]]) -> list[int]:
    """Reference positions of boundary times (seconds), given the clips as (start_s, end_s, first word, words)
    in recording order; see the module docstring."""
    positions = []
    for time in boundaries_s:
        position = 0
        for start, end, first, words in clips:
            if time < start:
                break
            if time < end:
                position = first + round(words * (time - start) / max(end - start, 1e-9))
                break
            position = first + words
        positions.append(position)
    return positions


def boundary_errors(reference_words: Sequence[str], hypothesis: str, positions: Sequence[int], n: int) -> dict:
    """Counts of one recording: reference words, words in boundary zones, deletions and insertions in and out of
    them, and the repeated insertions (see the module docstring)."""
    size = len(reference_words)
    near_word = [False] * size  # deletion zones, by reference word
    near_gap = [False] * (size + 1)  # insertion zones, by position between words
    for b in positions:
        for j in range(max(b - n, 0), min(b + n, size)):
            near_word[j] = True
        for i in range(max(b - n, 0), min(b + n, size) + 1):
            near_gap[i] = True
    counts = {"reference_words": size, "words_near_boundaries": sum(near_word), "lost": 0, "inserted": 0,
              "repeated": 0, "deleted_elsewhere": 0, "inserted_elsewhere": 0}
    position = 0
    for op, _, hyp_word in aligned_ops(" ".join(reference_words), hypothesis):
        if op == "insert":
            if near_gap[position]:
                counts["inserted"] += 1
                neighbours = reference_words[max(position - n, 0): position + n]
                counts["repeated"] += hyp_word in neighbours
            else:
                counts["inserted_elsewhere"] += 1
            continue
        if op == "delete":
            counts["lost" if near_word[position] else "deleted_elsewhere"] += 1
        position += 1
    return counts


def boundary_summary(counts: Sequence[dict], boundaries: int) -> dict:
    """The corpus-level boundary figures from per-recording `boundary_errors`, shares in percent."""
    total = {key: sum(c[key] for c in counts) for key in counts[0]} if counts else {}
    words, near = max(total.get("reference_words", 0), 1), total.get("words_near_boundaries", 0)
    far = total.get("reference_words", 0) - near
    return {
        "boundaries": boundaries,
        **total,
        "lost_pct": 100.0 * total.get("lost", 0) / words,
        "inserted_pct": 100.0 * total.get("inserted", 0) / words,
        "repeated_pct": 100.0 * total.get("repeated", 0) / words,
        "near_boundary_rate": 100.0 * (total.get("lost", 0) + total.get("inserted", 0)) / max(near, 1),
        "elsewhere_rate": 100.0 * (total.get("deleted_elsewhere", 0) + total.get("inserted_elsewhere", 0)) / max(far, 1),
    }


def score_long_form(references: Sequence[str], clip_texts: Sequence[Sequence[str]],
                    clip_spans_s: Sequence[Sequence[tuple[float, float]]], hypotheses: Sequence[str],
                    boundaries_s: Sequence[Sequence[float]], language: str | None, boundary_words: int) -> dict:
    """One decoding's scores over the recordings: `wer`, `cer`, `normalized_wer`, `normalized_cer` (corpus-level,
    as `loop.eval.metrics.compute_metrics`) and `boundary` (`boundary_summary`). Per recording: its reference, its
    clips' transcripts and (start, end) seconds, its hypothesis and its window boundaries in seconds."""
    normalize = normalizer_for(language)
    metrics = compute_metrics(references, hypotheses, language)
    counts, boundaries = [], 0
    for texts, spans, hypothesis, times in zip(clip_texts, clip_spans_s, hypotheses, boundaries_s):
        words_per_clip = [normalize(text).split() for text in texts]
        clips, first = [], 0
        for (start, end), words in zip(spans, words_per_clip):
            clips.append((start, end, first, len(words)))
            first += len(words)
        reference_words = [word for words in words_per_clip for word in words]
        positions = boundary_word_positions(times, clips)
        counts.append(boundary_errors(reference_words, normalize(hypothesis), positions, boundary_words))
        boundaries += len(times)
    return {**metrics, "boundary": boundary_summary(counts, boundaries)}


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def long_form_report_lines(long_form: dict) -> list[str]:
    """The "Long recordings" section of report.md: how the recordings were made, and sequential against chunked
    decoding (with the per-clip WER of the same clips beside them when known)."""
    sequential, chunked = long_form["sequential"], long_form["chunked"]
    lines = ["## Long recordings", "",
             (f"{long_form['recordings']} recordings of {long_form['min_recording_s']:.0f} to "
             f"{long_form['max_recording_s']:.0f} s ({long_form['audio_minutes']:.1f} min in all) joined from "
             f"{long_form['clips']} clips ({long_form['clips_left_out']} left out), a speaker's clips together where "
             f"possible, {long_form['gap_s']:g} s of silence between clips. Sequential: {sequential['method']}. "
             f"Chunked: {chunked['method']}. Errors at boundaries: deletions and insertions within "
             f"{long_form['boundary_words']} reference words of a window boundary, in % of all reference words."), ""]
    rows = [("WER %", "wer"), ("CER %", "cer"), ("normalized WER %", "normalized_wer"),
            ("normalized CER %", "normalized_cer")]
    header = "| | sequential | chunked |" + (" clips one by one |" if "clip_wer" in long_form else "")
    lines += [header, "|---|---|---|" + ("---|" if "clip_wer" in long_form else "")]
    for label, key in rows:
        clip = f" {_cell(long_form['clip_' + key])} |" if "clip_" + key in long_form else ""
        lines.append(f"| {label} | {_cell(sequential[key])} | {_cell(chunked[key])} |{clip}")
    extra = " |" if "clip_wer" in long_form else ""
    for label, key in (("window boundaries", "boundaries"), ("words lost at boundaries %", "lost_pct"),
                       ("words inserted at boundaries %", "inserted_pct"), ("... of them repeated %", "repeated_pct"),
                       ("deletions + insertions near boundaries %", "near_boundary_rate"),
                       ("deletions + insertions elsewhere %", "elsewhere_rate")):
        lines.append(f"| {label} | {_cell(sequential['boundary'][key])} | {_cell(chunked['boundary'][key])} |{extra}")
    note = "long_form_predictions.jsonl has each recording's clips, reference, both transcripts and window boundaries."
    return [*lines, "", note, ""]
