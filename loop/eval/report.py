"""Evaluation outputs for people: per-utterance predictions (JSONL), an error-analysis report (Markdown) and a
self-contained HTML page with the audio, for one model or two compared on the same utterances.

A prediction row is `{"index", "id", "audio_path", "reference", "hypothesis", "wer", "cer", "duration",
"implausible"}` (`implausible`: empty, or why preparation flagged the row; it is evaluated all the same); error
rates are percentages on the text as written (per utterance here, corpus-level in the summaries), with the
conventions of `loop.eval.metrics`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

from loop.eval.hallucination import worst_hallucinations
from loop.eval.long_form_metrics import long_form_report_lines
from loop.eval.metrics import aligned_ops, alignment_counts, error_rates, utterance_error_rates

# (label, lower bound inclusive, upper bound exclusive), seconds of audio
DURATION_BUCKETS = (("< 2 s", 0.0, 2.0), ("2-5 s", 2.0, 5.0), ("5-10 s", 5.0, 10.0), ("10-20 s", 10.0, 20.0),
                    ("20-30 s", 20.0, 30.0), (">= 30 s", 30.0, float("inf")))
TOP_ERRORS = 15  # rows in each of the substitution, deletion and insertion tables
TOP_DIFFERENCES = 10  # utterances shown where two models differ most
TOP_FLAGGED = 20  # implausible utterances listed in report.md (predictions.jsonl has them all)
DEFAULT_HTML_AUDIO_MB = 50.0  # clips embedded in report.html, in MB of files (base64 makes the page 4/3 of that)
AUDIO_MIME_TYPES = {".mp3": "audio/mpeg", ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}
SUMMARY_FIELDS = (  # (key in metrics.json, label)
    ("model", "model"),
    ("split", "split"),
    ("num_utterances", "utterances"),
    ("num_skipped", "skipped by data preparation"),
    ("num_implausible", "flagged as implausible (kept)"),
    ("wer", "WER %"),
    ("cer", "CER %"),
    ("normalized_wer", "normalized WER %"),
    ("normalized_cer", "normalized CER %"),
    ("loss", "loss"),
    ("language_id", "language ID % (detected as the split's language)"),
    ("insertion_rate", "inserted words % of reference words"),
    ("loop_share", "hypotheses that loop %"),
    ("long_share", "hypotheses over twice the reference's length %"),
    ("compressible_share", "hypotheses with compression ratio over 2.4 %"),
    ("reference_compressible_share", "references with compression ratio over 2.4 %"),
    ("empty_share", "empty hypotheses %"),
    ("seconds", "evaluation seconds"),
)
WORST_HALLUCINATIONS = 10  # flagged hypotheses listed in the report (metrics.json keeps the same ones)


# --- rows -------------------------------------------------------------------------------------------------------

def utterance_rows(predictions: Sequence[dict], table) -> list[dict]:
    """`evaluate()`'s predictions (`index`, `reference`, `hypothesis`) joined with their rows of the prepared
    `table` (`id`, `audio_path`, `duration`, and `implausible` where the table has it), with per-utterance WER and
    CER."""
    columns = table.select_columns([c for c in ("id", "audio_path", "duration", "implausible") if c in table.column_names])
    rows = []
    for prediction in predictions:
        source = columns[int(prediction["index"])]
        wer, cer = utterance_error_rates(prediction["reference"], prediction["hypothesis"])
        rows.append({
            "index": int(prediction["index"]),
            "id": source["id"],
            "audio_path": source["audio_path"],
            "reference": prediction["reference"],
            "hypothesis": prediction["hypothesis"],
            "wer": wer,
            "cer": cer,
            "duration": round(float(source["duration"]), 3),
            "implausible": source.get("implausible", ""),
            "detected_language": prediction.get("detected_language", ""),
        })
    return rows


def write_predictions_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    """One JSON object per utterance and line, UTF-8 (Devanagari stays readable)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- analysis ---------------------------------------------------------------------------------------------------

def duration_bucket_rates(rows: Sequence[dict]) -> list[dict]:
    """Corpus-level WER of the utterances in each duration bucket: `{"bucket", "utterances", "wer"}`, the wer
    None for an empty bucket; the open-ended last bucket only when it holds utterances."""
    buckets = []
    for label, low, high in DURATION_BUCKETS:
        inside = [row for row in rows if low <= row["duration"] < high]
        if not inside and high == float("inf"):
            continue
        references, hypotheses = [r["reference"] for r in inside], [r["hypothesis"] for r in inside]
        wer = error_rates(references, hypotheses)["wer"] if inside else None
        buckets.append({"bucket": label, "utterances": len(inside), "wer": wer})
    return buckets


def top_errors(rows: Sequence[dict], limit: int = TOP_ERRORS) -> dict[str, list[tuple]]:
    """The most frequent word errors: `substitutions` [((ref, hyp), count)], `deletions` and `insertions`
    [(word, count)], most frequent first."""
    counts = alignment_counts([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    return {kind: counts[kind].most_common(limit) for kind in ("substitutions", "deletions", "insertions")}


def paired_rows(rows: Sequence[dict], compare: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(row of model A, row of model B) for every utterance both evaluated, matched by `id`, in A's order."""
    by_id = {row["id"]: row for row in compare}
    return [(row, by_id[row["id"]]) for row in rows if row["id"] in by_id]


def largest_differences(rows: Sequence[dict], compare: Sequence[dict],
                        limit: int = TOP_DIFFERENCES) -> list[tuple[dict, dict]]:
    """The utterances whose per-utterance WER differs most between the two models (ties in id order);
    utterances with the same WER are left out."""
    pairs = [(a, b) for a, b in paired_rows(rows, compare) if a["wer"] != b["wer"]]
    pairs.sort(key=lambda pair: (-abs(pair[1]["wer"] - pair[0]["wer"]), pair[0]["id"]))
    return pairs[:limit]


# --- Markdown ---------------------------------------------------------------------------------------------------

def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _md_cell(value) -> str:
    """Table-safe text: pipes escaped, line breaks flattened, empty shown as a visible marker."""
    text = _format(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return text if text.strip() else "(empty)"


def _md_table(header: Sequence[str], body: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in body]
    return lines


def _summary_table(summary: dict) -> list[str]:
    second = summary.get("compare")
    header = ["", "model A", "model B"] if second else ["", "value"]
    body = [[label, summary.get(key), *([second.get(key)] if second else [])] for key, label in SUMMARY_FIELDS
            if key in summary]
    decoding = summary.get("decoding")
    if decoding:
        other = [_decoding_text(second.get("decoding", {}))] if second else []
        body.append(["decoding", _decoding_text(decoding), *other])
    return _md_table(header, body)


def _decoding_text(decoding: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in decoding.items())


def _bucket_table(rows: Sequence[dict], compare: Sequence[dict] | None) -> list[str]:
    buckets = duration_bucket_rates(rows)
    if compare is None:
        body = [[b["bucket"], b["utterances"], b["wer"]] for b in buckets]
        return _md_table(["duration", "utterances", "WER %"], body)
    other = {b["bucket"]: b for b in duration_bucket_rates(compare)}
    body = [[b["bucket"], b["utterances"], b["wer"], other.get(b["bucket"], {}).get("wer")] for b in buckets]
    return _md_table(["duration", "utterances", "WER % (A)", "WER % (B)"], body)


def _error_tables(rows: Sequence[dict], title: str) -> list[str]:
    errors = top_errors(rows)
    lines = [f"### Most frequent substitutions{title}", ""]
    lines += _md_table(["reference", "hypothesis", "count"], [[r, h, n] for (r, h), n in errors["substitutions"]])
    lines += ["", f"### Most frequent deletions{title}", ""]
    lines += _md_table(["reference word", "count"], errors["deletions"])
    lines += ["", f"### Most frequent insertions{title}", ""]
    lines += _md_table(["hypothesis word", "count"], errors["insertions"])
    return lines


def _differences_table(rows: Sequence[dict], compare: Sequence[dict]) -> list[str]:
    pairs = largest_differences(rows, compare)
    if not pairs:
        return ["The two models have the same WER on every utterance."]
    body = [[a["id"], a["reference"], a["hypothesis"], a["wer"], b["hypothesis"], b["wer"]] for a, b in pairs]
    return _md_table(["id", "reference", "hypothesis A", "WER A", "hypothesis B", "WER B"], body)


def _flagged_section(rows: Sequence[dict]) -> list[str]:
    """The utterances preparation flagged as implausible, if any: kept in every rate, listed to be checked."""
    flagged = [row for row in rows if row.get("implausible")]
    if not flagged:
        return []
    shown = f" (the first {TOP_FLAGGED}; predictions.jsonl has them all)" if len(flagged) > TOP_FLAGGED else ""
    lines = ["## Flagged as implausible", "",
             f"{len(flagged)} of {len(rows)} utterances have too little audio, or a transcript too fast or too slow for "
             "their audio (data.min_duration_s, data.min_chars_per_second, data.max_chars_per_second). They are kept "
             f"in every rate above, so the split is the published one; a truncated clip or a mismatched transcript "
             f"among them costs WER no model can win back{shown}.", ""]
    body = [[row["id"], row["duration"], row["reference"], row["wer"], row["implausible"]] for row in flagged[:TOP_FLAGGED]]
    return [*lines, *_md_table(["id", "seconds", "reference", "WER %", "why"], body), ""]


def _hallucination_section(rows: Sequence[dict]) -> list[str]:
    """The hypotheses `loop.eval.hallucination` flags (loops, far too long, too compressible, empty), worst first."""
    worst = worst_hallucinations(rows, WORST_HALLUCINATIONS)
    if not worst:
        return []
    lines = ["## Hallucinations", "",
             f"Hypotheses that loop, run past twice their reference's length, compress beyond Whisper's 2.4 or come "
             f"out empty, worst first (up to {WORST_HALLUCINATIONS}; the rates are in the summary).", ""]
    body = [[row.get("id", row.get("index")), row["reference"], row["hypothesis"], ", ".join(row["flags"]),
             row["repeated"]] for row in worst]
    return [*lines, *_md_table(["id", "reference", "hypothesis", "flags", "repeated n-gram"], body), ""]


def write_report_md(path: str | Path, summary: dict, predictions: Sequence[dict],
                    compare: Sequence[dict] | None = None) -> Path:
    """The report: summary, WER by duration bucket, the most frequent word errors, and with `compare` (model B's
    rows on the same utterances) both models side by side and the utterances where they differ most."""
    title = f"# Evaluation: {summary.get('model', 'model')} on {summary.get('split', 'split')}"
    lines = [title, ""]
    if compare is not None:
        lines += [f"Model A: `{summary.get('model')}`; model B: `{summary.get('compare', {}).get('model')}`, on the "
                  "same utterances.", ""]
    lines += ["## Summary", "", *_summary_table(summary), ""]
    lines += ["Rates are corpus-level percentages; the normalized ones after removing punctuation and case "
              "(Devanagari vowel signs are kept).", ""]
    lines += _flagged_section(predictions)
    lines += _hallucination_section(predictions)
    lines += ["## WER by duration", "", *_bucket_table(predictions, compare), ""]
    lines += ["## Word errors", "", *_error_tables(predictions, " (A)" if compare is not None else ""), ""]
    if compare is not None:
        lines += [*_error_tables(compare, " (B)"), ""]
        lines += ["## Where the two models differ most", "", *_differences_table(predictions, compare), ""]
    if summary.get("long_form"):
        lines += long_form_report_lines(summary["long_form"])
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --- HTML -------------------------------------------------------------------------------------------------------

HTML_STYLE = """
body { font-family: system-ui, "Noto Sans", "Noto Sans Devanagari", "Nirmala UI", Mangal, sans-serif; }
body { margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.text { font-size: 1.1em; max-width: 28em; }
.sub { background: #fff0b3; border-bottom: 2px solid #d9a400; }
.ins { background: #d7f5d7; border-bottom: 2px solid #2e8b2e; }
.del { background: #fbd5d5; text-decoration: line-through; color: #8b1e1e; }
.sub::after { content: " (" attr(data-ref) ")"; font-size: 0.75em; color: #8a6d00; }
.legend span { margin-right: 1em; padding: 0 0.3em; }
audio { width: 14em; }
"""


def mark_errors(reference: str, hypothesis: str) -> str:
    """The hypothesis as HTML, its word alignment to the reference marked: substituted words (`.sub`, with the
    reference word in `data-ref`), inserted words (`.ins`) and the reference words it lacks (`.del`)."""
    words = []
    for op, ref_word, hyp_word in aligned_ops(reference, hypothesis):
        if op == "equal":
            words.append(html.escape(hyp_word))
        elif op == "substitute":
            words.append(f'<span class="sub" data-ref="{html.escape(ref_word)}">{html.escape(hyp_word)}</span>')
        elif op == "insert":
            words.append(f'<span class="ins">{html.escape(hyp_word)}</span>')
        else:
            words.append(f'<span class="del">{html.escape(ref_word)}</span>')
    return " ".join(words)


def is_playable_clip(audio_path: str | None) -> bool:
    """Whether `audio_element` would embed this clip: a file of a type browsers play."""
    return bool(audio_path) and Path(audio_path).suffix.lower() in AUDIO_MIME_TYPES and Path(audio_path).is_file()


def audio_element(audio_path: str | None) -> str:
    """An `<audio controls>` element with the clip embedded as a base64 data: URI; empty when there is no file or
    its type is not one browsers play."""
    if not is_playable_clip(audio_path):
        return ""
    path = Path(audio_path)
    mime = AUDIO_MIME_TYPES[path.suffix.lower()]
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<audio controls preload="metadata" src="data:{mime};base64,{encoded}"></audio>'


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """`body` cells are HTML already."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(body_row) + "</tr>\n" for body_row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{rows}</tbody></table>"


def _html_summary(summary: dict) -> str:
    second = summary.get("compare")
    header = ["", "model A", "model B"] if second else ["", "value"]
    body = []
    for key, label in SUMMARY_FIELDS:
        if key in summary:
            values = [summary.get(key), *([second.get(key)] if second else [])]
            body.append([f"<th>{html.escape(label)}</th>", *(f"<td>{html.escape(_format(v))}</td>" for v in values)])
    return _html_table(header, body)


def audio_budget(rows: Sequence[dict], max_audio_mb: float) -> set[str]:
    """Ids of the utterances whose clips fit in `max_audio_mb` of files, the highest WER first (the ones worth
    listening to); a full test split would otherwise make a page of hundreds of MB."""
    chosen, used = set(), 0
    for row in sorted(rows, key=lambda r: -r["wer"]):
        path = row.get("audio_path")
        size = Path(path).stat().st_size if is_playable_clip(path) else None
        if size is not None and used + size <= max_audio_mb * 2**20:
            chosen.add(row["id"])
            used += size
    return chosen


def _html_utterance_row(row: dict, other: dict | None, with_audio: bool) -> list[str]:
    cells = [
        f"<td>{html.escape(row['id'])}<br><small>{row['duration']:.1f} s</small></td>",
        f"<td>{audio_element(row.get('audio_path')) if with_audio else ''}</td>",
        f'<td class="text">{html.escape(row["reference"])}</td>',
        f'<td class="text">{mark_errors(row["reference"], row["hypothesis"])}</td>',
        f"<td>{row['wer']:.1f}</td>",
        f"<td>{row['cer']:.1f}</td>",
    ]
    if other is not None:
        cells += [f'<td class="text">{mark_errors(other["reference"], other["hypothesis"])}</td>',
                  f"<td>{other['wer']:.1f}</td>"]
    return cells


def write_report_html(path: str | Path, summary: dict, predictions: Sequence[dict],
                      compare: Sequence[dict] | None = None, max_audio_mb: float = DEFAULT_HTML_AUDIO_MB) -> Path:
    """One self-contained page (inline CSS, audio embedded, no scripts): the summary, and every utterance with its
    reference and hypothesis, the errors marked, and its audio while `max_audio_mb` of clips last (highest WER
    first); with `compare`, model B's hypothesis beside A's."""
    with_audio = audio_budget(predictions, max_audio_mb)
    playable = sum(1 for row in predictions if is_playable_clip(row.get("audio_path")))
    others = {row["id"]: row for row in compare} if compare is not None else None
    header = ["id", "audio", "reference", "hypothesis (A)" if others is not None else "hypothesis", "WER %", "CER %"]
    if others is not None:
        header += ["hypothesis (B)", "WER % (B)"]
    body = [_html_utterance_row(row, others.get(row["id"]) if others is not None else None, row["id"] in with_audio)
            for row in predictions]
    if others is not None:
        body = [cells if len(cells) == len(header) else cells + ["<td></td>", "<td></td>"] for cells in body]
    language = html.escape(str(summary.get("decoding", {}).get("language", "")))
    worst = worst_hallucinations(predictions, WORST_HALLUCINATIONS)
    hallucinations = "" if not worst else "<h2>Hallucinations</h2>\n" + _html_table(
        ["id", "audio", "reference", "hypothesis", "flags"],
        [[f"<td>{html.escape(str(row['id']))}</td>", f"<td>{audio_element(row.get('audio_path'))}</td>",
          f'<td class="text">{html.escape(row["reference"])}</td>',
          f'<td class="text">{mark_errors(row["reference"], row["hypothesis"])}</td>',
          f"<td>{html.escape(', '.join(row['flags']))}</td>"] for row in worst])
    title = html.escape(f"Evaluation: {summary.get('model', 'model')} on {summary.get('split', 'split')}")
    page = f"""<!doctype html>
<html lang="{language}">
<head><meta charset="utf-8"><title>{title}</title><style>{HTML_STYLE}</style></head>
<body>
<h1>{title}</h1>
{_html_summary(summary)}
<p class="legend">Hypothesis marks: <span class="sub" data-ref="reference word">substituted</span>
<span class="ins">inserted</span> <span class="del">deleted (reference word)</span></p>
<p class="legend">Audio embedded for {len(with_audio)} of {playable} utterances with a playable clip (highest WER
first, up to {max_audio_mb:g} MB of clips; scripts/evaluate.py --html_audio_mb changes the limit).</p>
{hallucinations}
{_html_table(header, body)}
</body>
</html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
