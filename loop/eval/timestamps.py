"""Does a model still predict timestamps? Decode with them and score their form and their boundaries.

A model fine-tuned without timestamps does not stop emitting them under `generate(return_timestamps=True)`:
transformers' timestamp logits processor forces the first token to be a timestamp and timestamps to come in
non-decreasing pairs. What such a model loses shows as an opening timestamp never closed (the text runs to
`<|endoftext|>`), timestamps past the audio, or boundaries far from the speech. So each output is parsed into
segments (`parse_timestamps`) and scored (`score_timestamps`):

- well formed: one or more segments `<|start|> text <|end|>`, every timestamp paired (no text outside a segment,
  no segment left open or empty), within the row's audio (`RANGE_SLACK_S` of slack) and increasing (each segment
  ends after it starts, and starts where the previous one ended or later);
- boundary error: for each utterance's known start and end (its speech bounds by energy, shifted by its offset in
  the row, `loop.data.timestamp_labels`), the distance to the nearest predicted start (or end), in seconds, averaged per row
  and then over the rows that have a segment at all; nearest rather than n-th, so that one utterance split in two
  costs what its misplaced boundary is off by, not every later boundary.

`evaluate_timestamps` runs both on a prepared split's clips one by one (one segment each) and packed by
`utterances_per_row` (consecutive clips end to end within the model's window, one segment per utterance at its
true offset): the packed rows are where a model must place boundaries inside its window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loop.data.audio import SAMPLE_RATE, dequantize
from loop.data.timestamp_labels import RESOLUTION_S, TimestampTokens, quantize_down, quantize_up
from loop.eval.metrics import compute_metrics
from loop.model.encoder_window import batch_features, generation_inputs
from loop.model.sharding import full_parameters, generation_kwargs

RANGE_SLACK_S = 0.2  # a predicted time may pass the row's audio by this much (ten steps) and still be in range
PROBLEMS = ("no_timestamps", "unpaired", "out_of_range", "not_increasing")


@dataclass
class ParsedTimestamps:
    """One decoded output: its complete segments as (start, end) seconds and what is wrong with its form."""

    segments: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Names from PROBLEMS; empty for a well-formed output."""

    @property
    def well_formed(self) -> bool:
        return not self.problems


def parse_timestamps(token_ids: list[int], tokens: TimestampTokens, first_special: int,
                     duration: float) -> ParsedTimestamps:
    """Parses generated ids (prompt and `<|endoftext|>` included or not) into segments for a row of `duration`
    seconds. Ids at or above `first_special` (`<|endoftext|>`: Whisper puts every special token after the text
    tokens) that are not timestamps are left out, except `<|notimestamps|>`, which means no timestamps at all."""
    parsed = ParsedTimestamps()
    problems: set[str] = set()
    start, has_text, seen_timestamp = None, False, False
    for token in token_ids:
        if tokens.is_timestamp(token):
            seen_timestamp = True
            if start is None:
                start, has_text = tokens.seconds(token), False
            elif not has_text:  # a start followed by another timestamp: a segment with no text
                problems.add("unpaired")
                start = tokens.seconds(token)
            else:
                parsed.segments.append((start, tokens.seconds(token)))
                start = None
        elif token == tokens.no_timestamps:
            problems.add("no_timestamps")
        elif token < first_special:
            if start is None:
                problems.add("unpaired")  # text outside any segment
            has_text = True
    if start is not None:
        problems.add("unpaired")  # opened and never closed: the text ran to the end
    if not seen_timestamp:
        problems = {"no_timestamps"}
    times = [t for segment in parsed.segments for t in segment]
    if any(t > duration + RANGE_SLACK_S for t in times):
        problems.add("out_of_range")
    ends = [0.0] + [end for _, end in parsed.segments]
    if any(end <= begin or begin < previous
           for (begin, end), previous in zip(parsed.segments, ends)):
        problems.add("not_increasing")
    parsed.problems = [name for name in PROBLEMS if name in problems]
    return parsed


def boundary_error(predicted: list[tuple[float, float]], reference: list[tuple[float, float]]) -> float | None:
    """Mean distance in seconds from each reference start (end) to the nearest predicted start (end); None when
    nothing was predicted."""
    if not predicted or not reference:
        return None
    starts, ends = np.array([s for s, _ in predicted]), np.array([e for _, e in predicted])
    distances = [np.abs(starts - s).min() for s, _ in reference] + [np.abs(ends - e).min() for _, e in reference]
    return float(np.mean(distances))


def score_timestamps(parsed: list[ParsedTimestamps], references: list[list[tuple[float, float]]]) -> dict:
    """Shares (percent) of well-formed outputs and of outputs with as many segments as utterances, the count of
    each problem, and the mean boundary error in seconds over the rows with a segment (None if none has)."""
    rows = len(parsed)
    errors = [boundary_error(p.segments, r) for p, r in zip(parsed, references, strict=True)]
    measured = [e for e in errors if e is not None]
    return {
        "rows": rows,
        "well_formed_percent": 100.0 * sum(p.well_formed for p in parsed) / max(rows, 1),
        "segment_count_match_percent": 100.0 * sum(len(p.segments) == len(r) for p, r in zip(parsed, references))
        / max(rows, 1),
        "problems": {name: sum(name in p.problems for p in parsed) for name in PROBLEMS},
        "boundary_error_s": float(np.mean(measured)) if measured else None,
        "rows_with_segments": len(measured),
    }


@dataclass
class TimestampRow:
    """Audio to decode with timestamps and what it holds: `segments` (start, end) per utterance, `text` joined."""

    audio: np.ndarray
    segments: list[tuple[float, float]]
    text: str

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def timestamp_rows(table, utterances_per_row: int, window_s: float) -> list[TimestampRow]:
    """A prepared split's rows (`loop.data.prepare.prepare`, one utterance each, with their `segments`) as rows to
    decode: one by one for `utterances_per_row` 1, else consecutive rows joined end to end while the group has at
    most that many utterances and fits `window_s`; a row alone that fits nothing else is left out of the packed
    set (it is the single set's)."""
    clips = [TimestampRow(dequantize(np.asarray(row["audio"]), row["audio_scale"]),
                          [tuple(map(float, segment)) for segment in row["segments"]], row["text"])
             for row in table]
    if utterances_per_row == 1:
        return clips
    groups: list[list[TimestampRow]] = []
    for clip in clips:
        if (groups and len(groups[-1]) < utterances_per_row
                and sum(c.duration for c in groups[-1]) + clip.duration <= window_s):
            groups[-1].append(clip)
        else:
            groups.append([clip])
    return [join_clips(group) for group in groups if len(group) > 1]


def join_clips(clips: list[TimestampRow]) -> TimestampRow:
    """Clips end to end, each utterance's segments moved by its offset (outward to the timestamp grid)."""
    offsets = np.cumsum([0.0] + [clip.duration for clip in clips[:-1]])
    segments = [(quantize_down(offset + start), quantize_up(offset + end))
                for offset, clip in zip(offsets, clips) for start, end in clip.segments]
    return TimestampRow(np.concatenate([clip.audio for clip in clips]), segments,
                        " ".join(clip.text for clip in clips))


@torch.no_grad()
def decode_with_timestamps(model, log_mel, rows: list[TimestampRow], batch_size: int, max_length: int,
                           **engine_kwargs) -> list[list[int]]:
    """Generated ids per row with `return_timestamps=True`, greedy, language and task from the model's generation
    config, at the window the model's config records; `max_length` tokens at most, prompt included.
    `engine_kwargs`: `loop.model.sharding.generation_kwargs`."""
    settings = model.generation_config
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        audio = torch.zeros(len(batch), max(len(row.audio) for row in batch))
        for i, row in enumerate(batch):
            audio[i, : len(row.audio)] = torch.from_numpy(row.audio)
        features = batch_features(model, log_mel, audio.to(device))
        generated = model.generate(**generation_inputs(model, features), language=settings.language,
                                   task=settings.task, return_timestamps=True, num_beams=1, max_length=max_length,
                                   **engine_kwargs)
        sequences = generated["sequences"] if isinstance(generated, dict) else generated
        outputs += sequences.cpu().tolist()
    return outputs


def evaluate_timestamps(model, tokenizer, table, log_mel, *, batch_size: int = 16, utterances_per_row: int = 3,
                        language: str | None = None, engine_kwargs: dict | None = None) -> dict:
    """Timestamp decoding of `table`'s clips, one by one (`single`) and packed `utterances_per_row` to a row
    (`packed`, none when 1): per set `score_timestamps`' figures plus the WER and CER of the text decoded with
    timestamps. `model` is an unwrapped Whisper in eval mode, `log_mel` its features on the model's device."""
    was_training = model.training
    model.eval()
    tokens = TimestampTokens(tokenizer)
    window_s = min(log_mel.window_frames * log_mel.hop_length / log_mel.sampling_rate, (tokens.COUNT - 1) * RESOLUTION_S)
    base_length = model.generation_config.max_length or model.config.max_target_positions
    results = {}
    for name, per_row in (("single", 1), ("packed", utterances_per_row)):
        if per_row < 2 and name == "packed":
            continue
        rows = timestamp_rows(table, per_row, window_s)
        if not rows:
            continue
        # A packed row holds per_row utterances: room for all of them, within the decoder's positions.
        max_length = min(base_length * per_row, model.config.max_target_positions)
        ids = decode_with_timestamps(model, log_mel, rows, batch_size, max_length, **(engine_kwargs or {}))
        parsed = [parse_timestamps(row_ids, tokens, tokenizer.eos_token_id, row.duration)
                  for row_ids, row in zip(ids, rows)]
        scores = score_timestamps(parsed, [row.segments for row in rows])
        texts = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        rates = compute_metrics([row.text for row in rows], texts, language)
        results[name] = {**scores, "wer": rates["wer"], "cer": rates["cer"]}
    if was_training:
        model.train()
    return results


def evaluate_timestamps_in_step(accelerator, model, tokenizer, table, log_mel, **options) -> dict:
    """`evaluate_timestamps` of the training model (prepared, maybe sharded) on every process at once: each decodes
    the same rows, the model gathered whole under FSDP2 (`full_parameters`) and in lockstep under ZeRO-3
    (`synced_gpus`). A forward on the main process alone would wait forever in the all-gathers of a sharded
    model's hooks. All processes must call it; all return the same figures."""
    with full_parameters(model):
        return evaluate_timestamps(accelerator.unwrap_model(model), tokenizer, table, log_mel,
                                   engine_kwargs=generation_kwargs(accelerator), **options)


def timestamp_scalars(results: dict) -> dict:
    """`evaluate_timestamps`' figures as TensorBoard scalars: `eval/timestamp_<set>_<figure>`."""
    return {f"eval/timestamp_{kind}_{key}": value for kind, scores in results.items()
            for key, value in scores.items() if isinstance(value, (int, float)) and key != "rows"}
