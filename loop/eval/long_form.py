"""Long recordings from short clips, transcribed two ways: Whisper's sequential long-form generation and the
transformers pipeline's chunked decoding, scored side by side against the joined references
(`scripts/evaluate.py --long_form`; the scoring is in `loop.eval.long_form_metrics`).

Recordings: the split's clips, grouped by speaker (`client_id`, speakers in order of first appearance, each
speaker's clips in split order; clips without a speaker form one group), are joined end to end with
`gap_s` seconds of digital silence between clips, so that sentences do not run into each other. A recording
grows while it stays within `max_s`; it is closed at a change of speaker once it holds `min_s`, so a speaker with
enough audio gets recordings of their own and the others share. Clips left over at the end that make less than
`min_s` join the last recording when they fit within `max_s`, else they are left out (and counted). The
reference of a recording is its clips' transcripts joined by a space; each clip's offsets are kept, so a time in
the recording maps to a position in the reference.

Sequential (`sequential_transcripts`): `generate` on the whole recording's log-mel features with their attention
mask and `return_timestamps=True` (transformers' port of OpenAI's algorithm, Whisper paper section 4.5): it
decodes a window, moves the window to the last timestamp the model predicted (or by a full window when it
predicted none) and decodes again. Greedy by default, without conditioning on the previous window's text and
without temperature fallback: deterministic, and the same decoding the short clips get, so the difference
between the two columns is the way the audio is cut. `fallback=True` turns on OpenAI's heuristics (temperatures
0 to 1 by 0.2, compression-ratio and log-probability thresholds, conditioning on the previous text); it samples,
so its figures change from run to run. The window starts are read from `generate`'s `monitor_progress` callback.

Chunked (`chunked_transcripts`): the transformers ASR pipeline with `chunk_length_s` = the model's window and
its default stride (a sixth of the window on each side): overlapping windows decoded independently in batches
and stitched by the longest common token sequence of the overlaps (transformers#20104), the decoding that
transformers#37789 measures against sequential. Its window boundaries are the middles of the overlaps. Both paths
take the same 16-kHz waveform; the pipeline computes its features with the feature extractor, which
`loop.model.features.LogMel` matches to 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from loop.data.audio import SAMPLE_RATE, dequantize
from loop.data.sources import DataError
from loop.eval.long_form_metrics import score_long_form
from loop.eval.metrics import compute_metrics
from loop.model.features import LogMel, pad_waveforms

DEFAULT_MIN_S = 60.0  # a recording is 1 to 5 minutes long by default (issue 14)
DEFAULT_MAX_S = 300.0
DEFAULT_GAP_S = 0.5  # silence between joined clips
DEFAULT_BOUNDARY_WORDS = 2  # reference words on each side of a window boundary that count as "at" it
# OpenAI's `transcribe()` defaults for the fallback heuristics, with transformers' compression-ratio threshold
# (transformers compresses the tokens, not the text: its docs give 1.35 where OpenAI's text ratio is 2.4).
FALLBACK_SETTINGS = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 1.35,
                     "logprob_threshold": -1.0, "no_speech_threshold": 0.6, "condition_on_prev_tokens": True}


@dataclass(frozen=True)
class LongFormOptions:
    """How recordings are built and decoded (`--long_form_*` of scripts/evaluate.py)."""

    min_s: float = DEFAULT_MIN_S
    """Shortest recording, in seconds; must be longer than the model's window."""
    max_s: float = DEFAULT_MAX_S
    """Longest recording, in seconds."""
    gap_s: float = DEFAULT_GAP_S
    """Silence inserted between consecutive clips, in seconds."""
    boundary_words: int = DEFAULT_BOUNDARY_WORDS
    """Reference words on each side of a window boundary in which deletions and insertions count as the
    boundary's."""
    fallback: bool = False
    """Sequential decoding with temperature fallback and conditioning on the previous text (samples)."""

    def problems(self, window_s: float) -> list[str]:
        """What is wrong with the options for a model whose window is `window_s` seconds."""
        problems = []
        if self.min_s <= window_s:
            problems.append(f"--long_form_min_s {self.min_s:g} must be longer than the model's {window_s:g}-s window "
                            "(a recording within one window is not long-form)")
        if self.max_s < self.min_s:
            problems.append(f"--long_form_max_s {self.max_s:g} is under --long_form_min_s {self.min_s:g}")
        if self.gap_s < 0:
            problems.append(f"--long_form_gap_s {self.gap_s:g} must be 0 or more")
        if self.boundary_words < 1:
            problems.append(f"--long_form_boundary_words {self.boundary_words} must be 1 or more")
        return problems


@dataclass
class Clip:
    """One clip placed in a recording: its row in the prepared table and its span in the recording."""

    row: int
    id: str
    speaker: str
    text: str
    start: int
    """First sample of the clip in the recording."""
    end: int
    """One past its last sample."""


@dataclass
class Recording:
    id: str
    clips: list[Clip] = field(default_factory=list)
    samples: int = 0
    """Length in samples, gaps included."""

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def reference(self) -> str:
        return " ".join(clip.text for clip in self.clips)

    @property
    def speakers(self) -> list[str]:
        return list(dict.fromkeys(clip.speaker for clip in self.clips))


@dataclass
class Recordings:
    """The recordings built from a split, and the clips that made none."""

    recordings: list[Recording]
    clips_left_out: int


def speaker_order(speakers: Sequence[str]) -> list[int]:
    """Row indices grouped by speaker, speakers in order of first appearance, each speaker's rows in order."""
    groups: dict[str, list[int]] = {}
    for row, speaker in enumerate(speakers):
        groups.setdefault(speaker or "", []).append(row)
    return [row for rows in groups.values() for row in rows]


def build_recordings(rows: Sequence[dict], options: LongFormOptions, split: str,
                     sampling_rate: int = SAMPLE_RATE) -> Recordings:
    """Recordings from `rows` (`id`, `client_id`, `text`, `samples`: the clip's length in samples), as the
    module docstring says. Raises DataError when the rows cannot fill one recording of `options.min_s`, or when
    a clip cannot fit between `min_s` and `max_s`."""
    gap, low, high = round(options.gap_s * sampling_rate), options.min_s * sampling_rate, options.max_s * sampling_rate
    total = sum(row["samples"] for row in rows) + gap * max(len(rows) - 1, 0)
    if total < low:
        raise DataError(
            f"--long_form: split {split!r} has {len(rows)} usable clips, {total / sampling_rate:.1f} s of audio "
            f"joined ({options.gap_s:g}-s gaps included), less than one recording of --long_form_min_s "
            f"{options.min_s:g} s: pass --long_form_min_s of at most {total / sampling_rate:.0f} (and over the "
            "model's window), or a split with more clips (--data.eval_split; --data.max_eval_samples=0 for all)")
    longest = max(row["samples"] for row in rows)
    if high - low < longest + gap:
        raise DataError(
            f"--long_form: --long_form_max_s {options.max_s:g} leaves no room above --long_form_min_s "
            f"{options.min_s:g} for split {split!r}'s longest clip ({longest / sampling_rate:.1f} s plus the "
            f"{options.gap_s:g}-s gap): pass a --long_form_max_s of at least "
            f"{(low + longest + gap) / sampling_rate:.1f}")
    recordings: list[Recording] = []
    current, previous_speaker = Recording(""), None
    for index in speaker_order([row["client_id"] for row in rows]):
        row = rows[index]
        start = current.samples + (gap if current.clips else 0)
        speaker_changed = previous_speaker is not None and (row["client_id"] or "") != previous_speaker
        # Checked above: a recording that the next clip would push over max_s already holds min_s.
        if current.clips and (start + row["samples"] > high or (speaker_changed and current.samples >= low)):
            recordings.append(current)
            current, start = Recording(""), 0
        current.clips.append(Clip(index, row["id"], row["client_id"] or "", row["text"], start, start + row["samples"]))
        current.samples, previous_speaker = start + row["samples"], row["client_id"] or ""
    left_out = 0
    if current.samples >= low:
        recordings.append(current)
    elif recordings and recordings[-1].samples + gap + current.samples <= high:
        last = recordings[-1]
        shift = last.samples + gap
        last.clips += [Clip(c.row, c.id, c.speaker, c.text, c.start + shift, c.end + shift) for c in current.clips]
        last.samples = shift + current.samples
    else:
        left_out = len(current.clips)
    for number, recording in enumerate(recordings, start=1):
        recording.id = f"{split}-long-{number:04d}"
    return Recordings(recordings, left_out)


# --- audio ------------------------------------------------------------------------------------------------------

def plan_recordings(table, processor, options: LongFormOptions, split: str) -> Recordings:
    """The recordings `evaluate_long_form` will decode from the prepared `table`, without reading any audio (a
    clip's samples come from its `duration`, len / 16000 in float32: exact to a hundredth of a sample), or the
    DataError that says why there can be none. Cheap, so every process runs it and fails alike."""
    problems = options.problems(float(processor.feature_extractor.chunk_length))
    if problems:
        raise DataError("--long_form: " + "; ".join(problems))
    info = table.select_columns(["id", "client_id", "text", "duration"])
    rows = [{"id": row["id"], "client_id": row["client_id"] or "", "text": row["text"],
             "samples": round(row["duration"] * SAMPLE_RATE)} for row in info]
    return build_recordings(rows, options, split)


def recording_audio(recording: Recording, table) -> np.ndarray:
    """The recording's 16-kHz waveform: its clips' audio, read from the prepared table when it is decoded (only a
    batch of recordings is ever in memory), at their offsets, silence in the gaps."""
    from loop.data.loaders import Rows  # the Arrow reader of the loaders: int16 audio without a copy to int64

    waveform = np.zeros(recording.samples, dtype=np.float32)
    rows = Rows(table).__getitems__([clip.row for clip in recording.clips])
    for clip, row in zip(recording.clips, rows):
        waveform[clip.start:clip.end] = dequantize(row["audio"], row["audio_scale"])
    return waveform


# --- decoding ---------------------------------------------------------------------------------------------------

def generation_kwargs(model, fallback: bool) -> dict:
    """`generate`'s long-form arguments: language and task as the model folder says, timestamps (they move the
    window), and either plain greedy decoding or OpenAI's fallback heuristics (see the module docstring)."""
    settings = model.generation_config
    decoding = dict(FALLBACK_SETTINGS) if fallback else {"condition_on_prev_tokens": False}
    return {"language": settings.language, "task": settings.task, "return_timestamps": True, **decoding}


@torch.no_grad()
def sequential_generate(model, log_mel: LogMel, audio: torch.Tensor, lengths: torch.Tensor, fallback: bool = False,
                        progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, list[list[float]]]:
    """Token ids (batch, length) of long-form generation over a padded batch of recordings (batch, samples) on
    the model's device, and each recording's window starts after the first, in seconds. `progress` gets the share
    of the batch's audio decoded so far, once per window."""
    frames = lengths // log_mel.hop_length
    features = log_mel(audio, n_frames=int(frames.max()), truncate=False)
    mask = (torch.arange(features.shape[-1], device=audio.device)[None, :] < frames.to(audio.device)[:, None]).long()
    frame_s = log_mel.hop_length / log_mel.sampling_rate
    starts: list[set[int]] = [set() for _ in range(len(lengths))]

    def monitor(seek_and_total: torch.Tensor) -> None:  # (batch, 2): each recording's window start and its frames
        values = seek_and_total.tolist()
        for row, (seek, total) in enumerate(values):
            if 0 < seek < total:
                starts[row].add(int(seek))
        if progress is not None:
            progress(sum(min(s, t) for s, t in values) / max(sum(t for _, t in values), 1))

    token_ids = model.generate(input_features=features.to(model.dtype), attention_mask=mask,
                               monitor_progress=monitor, **generation_kwargs(model, fallback))
    return token_ids, [[seek * frame_s for seek in sorted(row)] for row in starts]


@torch.no_grad()
def transcribe_long(model, log_mel: LogMel, tokenizer, audio: torch.Tensor, fallback: bool = False,
                    progress: Callable[[float], None] | None = None) -> str:
    """One recording (1, samples) longer than the model's window, with sequential long-form generation: the
    transcript (the demo's long-form path)."""
    audio = audio.to(model.device)
    token_ids, _ = sequential_generate(model, log_mel.to(model.device), audio,
                                       torch.tensor([audio.shape[1]]), fallback, progress)
    return tokenizer.batch_decode(token_ids, skip_special_tokens=True)[0].strip()


def sequential_transcripts(model, processor, waveform: Callable[[int], np.ndarray], count: int, batch_size: int,
                           fallback: bool = False) -> tuple[list[str], list[list[float]]]:
    """Sequential long-form transcripts of `count` recordings (`waveform(i)` is the i-th), `batch_size` at a time,
    and their window boundaries in seconds."""
    log_mel = LogMel(processor.feature_extractor).to(model.device)
    texts, boundaries = [], []
    for first in tqdm(range(0, count, batch_size), desc="long-form sequential", leave=False):
        audio, lengths = pad_waveforms([waveform(i) for i in range(first, min(first + batch_size, count))])
        token_ids, starts = sequential_generate(model, log_mel, audio.to(model.device), lengths, fallback)
        texts += [text.strip() for text in processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
        boundaries += starts
    return texts, boundaries


def chunk_boundaries(samples: int, chunk: int, left: int, right: int, sampling_rate: int = SAMPLE_RATE) -> list[float]:
    """Seconds where the pipeline's consecutive chunks of a `samples`-long input are stitched: the middle of each
    overlap (its `chunk_iter`: chunks of `chunk` samples every `chunk - left - right`)."""
    step, boundaries, start = chunk - left - right, [], 0
    while start + chunk < samples:  # the chunk at `start` is not the last: another one overlaps it
        start += step
        if samples - start > left:  # the pipeline drops a last chunk that holds only its left stride
            boundaries.append((start + (left + right) / 2) / sampling_rate)
    return boundaries


def chunked_transcripts(model, processor, waveform: Callable[[int], np.ndarray], lengths: Sequence[int],
                        batch_size: int) -> tuple[list[str], list[list[float]], str]:
    """Transcripts of the transformers ASR pipeline with `chunk_length_s` = the model's window and its default
    stride, for recordings of `lengths` samples (`waveform(i)` is the i-th), chunks decoded `batch_size` at a
    time; their stitching points in seconds; and the method in words."""
    from transformers import pipeline

    fe = processor.feature_extractor
    window_s = float(fe.chunk_length)
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=fe, device=model.device, ignore_warning=True)  # its chunking is what we measure
    stride_s = window_s / 6  # the pipeline's default, given explicitly so the boundaries below use the same
    settings = model.generation_config
    inputs = ({"raw": waveform(i), "sampling_rate": fe.sampling_rate} for i in range(len(lengths)))
    outputs = asr(inputs,
                  chunk_length_s=window_s, stride_length_s=stride_s, batch_size=batch_size,
                  generate_kwargs={"language": settings.language, "task": settings.task})
    align = asr._align_to  # how the pipeline rounds chunk and stride lengths (samples per encoder frame)
    chunk = int(round(window_s * fe.sampling_rate / align) * align)
    stride = int(round(stride_s * fe.sampling_rate / align) * align)
    texts = [output["text"].strip() for output in tqdm(outputs, total=len(lengths), desc="long-form chunked", leave=False)]
    boundaries = [chunk_boundaries(samples, chunk, stride, stride, fe.sampling_rate) for samples in lengths]
    method = (f"transformers pipeline, chunk_length_s={window_s:g}, stride_length_s={stride_s:g} on each side, "
              "chunks stitched by their longest common token sequence")
    return texts, boundaries, method


# --- the evaluation ---------------------------------------------------------------------------------------------

def evaluate_long_form(model, processor, table, options: LongFormOptions, split: str, language: str | None,
                       batch_size: int, clip_predictions: Sequence[dict] | None = None,
                       built: Recordings | None = None) -> tuple[dict, list[dict]]:
    """Builds recordings from the prepared `table` (in split order; `built`: `plan_recordings`' result, already
    computed), transcribes them both ways and scores both.
    Returns the `long_form` entry of metrics.json and one row per recording for long_form_predictions.jsonl.
    With `clip_predictions` (the clips decoded one by one: `index` in `table`, `reference`, `hypothesis`), the
    entry also holds their rates over the clips the recordings use (`clip_wer`, ...), the baseline of both."""
    window_s = float(processor.feature_extractor.chunk_length)
    built = built or plan_recordings(table, processor, options, split)
    recordings = built.recordings

    def waveform(i: int) -> np.ndarray:
        return recording_audio(recordings[i], table)

    sequential, sequential_windows = sequential_transcripts(model, processor, waveform, len(recordings), batch_size,
                                                            options.fallback)
    chunked, chunked_windows, chunked_method = chunked_transcripts(model, processor, waveform,
                                                                   [r.samples for r in recordings], batch_size)
    references = [recording.reference for recording in recordings]
    texts = [[clip.text for clip in recording.clips] for recording in recordings]
    spans = [[(clip.start / SAMPLE_RATE, clip.end / SAMPLE_RATE) for clip in recording.clips] for recording in recordings]

    def scores(hypotheses, windows):
        return score_long_form(references, texts, spans, hypotheses, windows, language, options.boundary_words)

    settings = model.generation_config
    method = ("generate() over the whole recording with return_timestamps=True, "
              + ("temperature fallback 0-1 by 0.2, conditioned on the previous text"
                 if options.fallback else f"{'greedy' if (settings.num_beams or 1) == 1 else f'{settings.num_beams} beams'}, "
                 "not conditioned on the previous text, no temperature fallback"))
    seconds = [recording.seconds for recording in recordings]
    summary = {
        "recordings": len(recordings),
        "clips": sum(len(recording.clips) for recording in recordings),
        "clips_left_out": built.clips_left_out,
        "audio_minutes": sum(seconds) / 60,
        "min_recording_s": min(seconds),
        "max_recording_s": max(seconds),
        "mean_speakers": sum(len(r.speakers) for r in recordings) / len(recordings),
        "window_s": window_s,
        **{key: value for key, value in asdict(options).items() if key != "fallback"},
        "sequential": {"method": method, **scores(sequential, sequential_windows)},
        "chunked": {"method": chunked_method, **scores(chunked, chunked_windows)},
    }
    if clip_predictions is not None:
        used = {clip.row for recording in recordings for clip in recording.clips}
        chosen = [p for p in clip_predictions if int(p["index"]) in used]
        rates = compute_metrics([p["reference"] for p in chosen], [p["hypothesis"] for p in chosen], language)
        summary.update({f"clip_{key}": value for key, value in rates.items()})
    rows = [{"id": recording.id, "seconds": round(recording.seconds, 3), "speakers": recording.speakers,
             "clips": [{"id": c.id, "start_s": round(c.start / SAMPLE_RATE, 3), "end_s": round(c.end / SAMPLE_RATE, 3)}
                       for c in recording.clips],
             "reference": recording.reference, "sequential": seq, "chunked": chu,
             "sequential_boundaries_s": [round(t, 3) for t in seq_b], "chunked_boundaries_s": [round(t, 3) for t in chu_b]}
            for recording, seq, chu, seq_b, chu_b in zip(recordings, sequential, chunked, sequential_windows, chunked_windows)]
    return summary, rows


def summary_line(long_form: dict) -> str:
    """One line for the console."""
    seq, chu = long_form["sequential"], long_form["chunked"]
    return (f"long-form ({long_form['recordings']} recordings, {long_form['audio_minutes']:.1f} min): "
            f"WER sequential {seq['wer']:.2f} vs chunked {chu['wer']:.2f}  CER {seq['cer']:.2f} vs {chu['cer']:.2f}  "
            f"words lost/repeated at window boundaries: sequential {seq['boundary']['lost_pct']:.2f}%/"
            f"{seq['boundary']['repeated_pct']:.2f}%, chunked {chu['boundary']['lost_pct']:.2f}%/"
            f"{chu['boundary']['repeated_pct']:.2f}%")
