"""Pseudo-labels: a teacher's transcripts of a source's split, written as a manifest the data layer reads, for
training a student on the teacher's own outputs (distil-whisper's recipe), also on audio nobody transcribed.

Every row is decoded with the project's decoding (`loop.model.decoding.transcribe`, as the model folder says) and,
where the source has a transcript, scored against it (WER after `loop.eval.metrics.normalizer_for`); with a WER
threshold the rows where the teacher disagrees with the human label are dropped (distil-whisper's filter: such a
row is more often a bad label or a teacher's hallucination than a lesson). Rows that cannot be read are skipped and
counted, like preparation does.

The work is resumable and safe to kill, like preparation: rows are decoded in parts of `part_rows`, each part
written under a temporary name and renamed when complete (a part file that exists is complete: its presence is
the completion marker), into `.<split>_pseudo.parts/` beside the manifest, with a `plan.json` naming the teacher,
source and rows the parts belong to. A rerun decodes only the missing parts; the manifest and the report are
written (atomically) from all parts at the end, so the threshold can be changed without decoding again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile
import torch

from loop.config import RunConfig, resolve_path
from loop.data.audio import SAMPLE_RATE, AudioError, as_cached, decode_audio
from loop.data.sources import (
    MAX_MESSAGES_PER_REASON,
    DataError,
    SkipLog,
    find_common_voice_dir,
    find_manifest,
    load_utterances,
)
from loop.eval.metrics import compute_metrics
from loop.files import write_json_atomic, write_text_atomic
from loop.model.decoding import transcribe
from loop.model.encoder_window import batch_features
from loop.model.features import LogMel, pad_waveforms
from loop.model.loading import load_for_inference

DEFAULT_PART_ROWS = 64  # rows per part file: what a kill can cost at most, and one progress line


@dataclass
class PseudoLabelReport:
    """What pseudo-labelling did with one split's rows (written as `<split>_pseudo.report.json`)."""

    model: str
    split: str
    manifest: str
    read: int = 0
    """Rows the source listed (after the source's own checks)."""
    labelled: int = 0
    """Rows the teacher transcribed."""
    kept: int = 0
    """Rows written to the manifest."""
    skipped: dict = field(default_factory=dict)
    """Rows that could not be decoded, by reason (a corrupt or missing clip, one longer than the window)."""
    skip_messages: dict = field(default_factory=dict)
    compared: int = 0
    """Transcribed rows with a human label, scored against it."""
    wer: float | None = None
    """Normalized WER of the teacher against the human labels over the compared rows, in percent."""
    wer_threshold: float | None = None
    dropped_by_wer: int = 0
    """Rows whose WER against their human label was above `wer_threshold` (not in the manifest)."""
    parts_decoded: int = 0
    """Parts decoded by this run (the others were complete from an earlier one)."""
    parts_reused: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        wer = f"; teacher WER against the labels {self.wer:.2f} over {self.compared} rows" if self.wer is not None else ""
        dropped = (f"; {self.dropped_by_wer} dropped above WER {self.wer_threshold:g}"
                   if self.wer_threshold is not None else "")
        return (f"{self.split}: {self.kept} of {self.read} rows pseudo-labelled into {self.manifest}; skipped: "
                f"{skipped}{wer}{dropped} ({self.parts_decoded} parts decoded, {self.parts_reused} reused)")


def output_folder(config: RunConfig, split: str, output_dir: str | None) -> Path:
    """`output_dir`, else beside the originals: the Common Voice locale folder or the manifest's folder."""
    if output_dir:
        return resolve_path(output_dir)
    data = config.data
    if data.source == "common_voice":
        return find_common_voice_dir(data.path, data.locale)
    if data.source == "manifest":
        return find_manifest(data.path, split).parent
    raise DataError("pseudo-labelling a hub dataset needs --output_dir (there is no folder of originals to write beside)")


def pseudo_label(config: RunConfig, model_name: str, split: str, output_dir: str | None = None, *,
                 wer_threshold: float | None = None, batch_size: int = 16, part_rows: int = DEFAULT_PART_ROWS,
                 log=print) -> PseudoLabelReport:
    """Decodes every row of `config.data`'s `split` with `model_name`, writes `<split>_pseudo.csv` (columns audio,
    sentence: the pseudo-label, client_id, id, reference, wer) and `<split>_pseudo.report.json` to
    `output_folder`, and returns the report; with `data.max_train_samples`, its first rows only. Train on it with `--data.source=manifest --data.path=<folder>
    --data.train_splits=<split>_pseudo`."""
    skips = SkipLog(strict=config.data.strict)
    rows = load_utterances(config.data, split, skips, labelled=False).to_list()
    if config.data.max_train_samples:  # the first rows, as a quick trial
        rows = rows[:config.data.max_train_samples]
    folder = output_folder(config, split, output_dir)
    parts_dir = folder / f".{split}_pseudo.parts"
    check_plan(parts_dir, {"model": model_name, "source": config.data.source, "path": config.data.path,
                           "dataset_name": config.data.dataset_name, "split": split, "rows": len(rows),
                           "ids": hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest(),
                           "part_rows": part_rows})
    model, processor = load_for_inference(model_name, fallback_language=config.model.language)
    log_mel = LogMel(processor.feature_extractor)
    decoded = reused = 0
    for number, start in enumerate(range(0, len(rows), part_rows)):
        part = parts_dir / f"part-{number:05d}.jsonl"
        if part.exists():
            reused += 1
            continue
        started = time.perf_counter()
        records = label_rows(rows[start:start + part_rows], model, processor, log_mel, batch_size,
                             folder / f"{split}_pseudo_clips")
        write_text_atomic(part, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        decoded += 1
        log(f"pseudo-labels: rows {start + 1}-{start + len(records)} of {len(rows)} "
            f"({time.perf_counter() - started:.1f} s)")
    records = [json.loads(line) for part in sorted(parts_dir.glob("part-*.jsonl"))
               for line in part.read_text(encoding="utf-8").splitlines()]
    report = PseudoLabelReport(model_name, split, str(folder / f"{split}_pseudo.csv"), read=len(rows),
                               wer_threshold=wer_threshold, parts_decoded=decoded, parts_reused=reused)
    kept = summarise(records, report, skips, wer_threshold, model.generation_config.language)
    write_text_atomic(report.manifest, manifest_text(kept))
    write_json_atomic(folder / f"{split}_pseudo.report.json", asdict(report))
    log(report.summary())
    return report


def check_plan(parts_dir: Path, plan: dict) -> None:
    """Parts already in `parts_dir` must belong to the same teacher, source, rows and part size; a new folder
    gets `plan.json`."""
    plan_file = parts_dir / "plan.json"
    if plan_file.exists():
        saved = json.loads(plan_file.read_text(encoding="utf-8"))
        if saved != plan:
            changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in plan.items() if saved.get(key) != value]
            raise DataError(f"{parts_dir} holds parts of another pseudo-labelling ({'; '.join(changed)}): delete it "
                            "to start again, or run with the same settings to resume")
        return
    write_json_atomic(plan_file, plan)


def label_rows(rows: list[dict], model, processor, log_mel, batch_size: int, clips_dir: Path) -> list[dict]:
    """One record per row: `pseudo_label` and `wer` set, or `skip_reason` and `skip_message`. Audio that comes as
    bytes (a hub dataset) is written to `clips_dir` as a 16-kHz WAV, so the manifest can name a file."""
    window = processor.feature_extractor.n_samples
    records, audio = [], []
    for row in rows:
        record = {"id": row["id"], "audio": str(Path(row["audio_path"]).resolve()) if row["audio_path"] else "",
                  "client_id": row["client_id"], "reference": " ".join(row["text"].split()), "origin": row["origin"]}
        records.append(record)
        try:
            waveform = decode_audio(row["audio_path"] or row["audio_bytes"])
        except AudioError as error:
            record.update(skip_reason=error.reason, skip_message=f"{row['origin']}: {error}")
            continue
        if len(waveform) > window:
            record.update(skip_reason="too_long", skip_message=f"{row['origin']}: {len(waveform) / SAMPLE_RATE:.1f} s "
                          f"of audio, over the model's {window / SAMPLE_RATE:g}-s window")
            continue
        if not row["audio_path"]:
            clips_dir.mkdir(parents=True, exist_ok=True)
            record["audio"] = str(clips_dir / f"{hashlib.sha1(row['id'].encode()).hexdigest()[:16]}.wav")
            soundfile.write(record["audio"], waveform, SAMPLE_RATE)
        audio.append((record, as_cached(waveform)))  # the samples training will read from its cache
    language = model.generation_config.language
    for start in range(0, len(audio), batch_size):
        batch = audio[start:start + batch_size]
        waveforms, _ = pad_waveforms([waveform for _, waveform in batch])
        with torch.no_grad():
            texts = transcribe(model, batch_features(model, log_mel, waveforms), processor.tokenizer)
        for (record, _), text in zip(batch, texts):
            record["pseudo_label"] = " ".join(text.split())  # one line: read_manifest reads a row per line
            record["wer"] = (compute_metrics([record["reference"]], [text], language)["normalized_wer"]
                             if record["reference"].strip() else None)
    return records


def summarise(records: list[dict], report: PseudoLabelReport, skips: SkipLog, wer_threshold: float | None,
              language: str) -> list[dict]:
    """Fills `report` from the records (and the source's own skips) and returns the rows for the manifest."""
    counts, messages = Counter(skips.counts), {reason: list(kept) for reason, kept in skips.messages.items()}
    labelled = [r for r in records if "pseudo_label" in r]
    for record in records:
        if "skip_reason" in record:
            counts[record["skip_reason"]] += 1
            kept = messages.setdefault(record["skip_reason"], [])
            if len(kept) < MAX_MESSAGES_PER_REASON:
                kept.append(record["skip_message"])
    compared = [r for r in labelled if r["wer"] is not None]
    report.labelled, report.compared = len(labelled), len(compared)
    report.skipped, report.skip_messages = dict(counts), messages
    if compared:
        report.wer = compute_metrics([r["reference"] for r in compared], [r["pseudo_label"] for r in compared],
                                     language)["normalized_wer"]
    kept = [r for r in labelled if wer_threshold is None or r["wer"] is None or r["wer"] <= wer_threshold]
    report.dropped_by_wer, report.kept = len(labelled) - len(kept), len(kept)
    return kept


def manifest_text(records: list[dict]) -> str:
    """A CSV manifest `loop.data.sources.read_manifest` reads (audio, sentence, client_id, id), with each row's
    human label and WER beside it for a look."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["audio", "sentence", "client_id", "id", "reference", "wer"])
    for r in records:
        writer.writerow([r["audio"], r["pseudo_label"], r["client_id"], r["id"], r["reference"],
                         "" if r["wer"] is None else f"{r['wer']:.2f}"])
    return buffer.getvalue()
