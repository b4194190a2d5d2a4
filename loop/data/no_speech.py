"""No-speech training rows: silence or noise whose target is the empty transcript (`data.no_speech_fraction`).

Whisper was trained on audio without speech too, so that it says nothing when nothing is said; fine-tuning on
speech alone teaches the opposite (every window holds words), and a fine-tuned model invents text on silence. These
rows put the lesson back. Their label is the run's prefix and end-of-text, `<|startoftranscript|><|hi|>
<|transcribe|><|notimestamps|><|endoftext|>`: with the language and task forced at generation, as the loop and
Hugging Face's pipeline decode, the empty transcript is what "nothing was said" is. Whisper's own `<|nospeech|>`
(`<|nocaptions|>` in the first vocabularies) is read from the logits after `<|startoftranscript|>` as a
probability (`no_speech_prob`), not generated, so it is no label here.

A row is digital silence, white noise or pink (1/f) noise at a random level (generated), or an excerpt of a clip
from `data.no_speech_dir`; its length is drawn from the training rows' durations, so nothing but the absence of
speech tells it apart. Everything is drawn from `train.seed`: the recipe (kind, level, length, clip, offset) once
for all rows, each row's samples from its own generator, so a row does not depend on the map batch or the
process that makes it. The rows go through `datasets.map` into an Arrow file named by a fingerprint of the recipe,
the labels and the noise files, like the prepared splits (`loop.data.prepare`), with the same columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import datasets
import numpy as np

from loop.config import resolve_path
from loop.data.audio import SAMPLE_RATE, quantize
from loop.data.augment import NOISE_SUFFIXES, load_noise_clips
from loop.data.cache_files import cached_map
from loop.data.prepare import DEFAULT_CACHE_DIR, PREP_VERSION, PREPARED_FEATURES
from loop.data.rows import KEPT_COLUMNS

NO_SPEECH_VERSION = 1  # bump when what a recipe generates changes
GENERATED_KINDS = ("silence", "white", "pink")
LEVEL_DBFS = (-75.0, -35.0)  # RMS level of generated noise, dB below full scale: a quiet room to a noisy one
STREAM = zlib.crc32(b"no-speech")  # keeps these draws apart from every other use of the seed


def no_speech_count(speech_rows: int, fraction: float) -> int:
    """How many no-speech rows make `fraction` of the rows once added to `speech_rows`."""
    return round(speech_rows * fraction / (1 - fraction)) if fraction > 0 and speech_rows else 0


def no_speech_recipe(count: int, durations, seed: int, clip_sizes: list[int] | None = None) -> dict[str, list]:
    """Columns `id`, `kind`, `level_db`, `samples`, `clip`, `offset` of `count` rows: lengths drawn (with
    replacement) from `durations` (seconds); generated kinds and levels, or with `clip_sizes` (samples of each
    folder clip) a clip and an offset, the row cut to the clip where the clip is shorter."""
    rng = np.random.default_rng([seed % 2**64, STREAM])
    samples = np.round(rng.choice(np.asarray(durations, dtype=np.float64), count) * SAMPLE_RATE).astype(np.int64)
    samples = np.maximum(samples, 1)
    if clip_sizes:
        sizes = np.asarray(clip_sizes, dtype=np.int64)
        clip = rng.integers(len(sizes), size=count)
        samples = np.minimum(samples, sizes[clip])
        offset = (rng.random(count) * (sizes[clip] - samples + 1)).astype(np.int64)
        kind, level = ["clip"] * count, [0.0] * count
    else:
        clip, offset = np.full(count, -1), np.zeros(count, dtype=np.int64)
        kind = [GENERATED_KINDS[k] for k in rng.integers(len(GENERATED_KINDS), size=count)]
        level = rng.uniform(*LEVEL_DBFS, size=count).round(2).tolist()
    return {"id": [f"no-speech-{i:05d}" for i in range(count)], "kind": kind, "level_db": level,
            "samples": samples.tolist(), "clip": clip.tolist(), "offset": offset.tolist()}


def pink_noise(samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples,) noise whose power falls as 1/f (3 dB per octave, like most room and street noise): white noise
    with its spectrum's amplitudes divided by sqrt(f), the DC bin left out."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    frequency = np.arange(len(spectrum), dtype=np.float64)
    spectrum[1:] /= np.sqrt(frequency[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, samples)


def synthesize(kind: str, samples: int, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """(samples,) float32 of one generated row: zeros, or noise scaled to an RMS of `level_db` dBFS."""
    if kind == "silence":
        return np.zeros(samples, dtype=np.float32)
    noise = rng.standard_normal(samples) if kind == "white" else pink_noise(samples, rng)
    rms = float(np.sqrt(np.mean(noise**2))) or 1.0
    return (noise * (10 ** (level_db / 20) / rms)).astype(np.float32)


def _no_speech_batch(batch, indices, labels: list[int], clips: list[np.ndarray], seed: int) -> dict:
    """Batched map function: a recipe's rows -> prepared columns (`loop.data.prepare.output_columns`'s)."""
    audio, scales = [], []
    for row, index in enumerate(indices):
        samples, clip = batch["samples"][row], batch["clip"][row]
        if clip >= 0:
            waveform = clips[clip][batch["offset"][row]: batch["offset"][row] + samples]
        else:
            rng = np.random.default_rng([seed % 2**64, STREAM, index])  # the row's own draws
            waveform = synthesize(batch["kind"][row], samples, batch["level_db"][row], rng)
        quantized, scale = quantize(waveform)
        audio.append(quantized)
        scales.append(scale)
    rows = len(indices)
    return {
        "audio": audio, "audio_scale": scales, "labels": [labels] * rows,
        "duration": [n / SAMPLE_RATE for n in batch["samples"]],
        "utterances": [0] * rows,  # no utterance in it: the loop's utterance counts stay the speech's
        "segments": [[] for _ in range(rows)], "timestamped": [False] * rows,  # no speech, no segment
        "skip_reason": [""] * rows, "skip_message": [""] * rows, "implausible": [""] * rows,
        **{name: [""] * rows for name in KEPT_COLUMNS},
        "id": batch["id"], "text": [""] * rows,
        "audio_path": [f"({kind})" if clip < 0 else f"clip {clip}" for kind, clip in zip(batch["kind"], batch["clip"])],
    }


def no_speech_rows(count: int, durations, seed: int, tokenizer, noise_dir: str = "",
                   cache_dir: str | Path = "") -> datasets.Dataset:
    """`count` prepared no-speech rows (columns of `loop.data.prepare.prepare`, `text` empty, `utterances` 0), labelled
    with `tokenizer`'s prefix and end-of-text, cached under a fingerprint of everything that makes them."""
    clips = ([clip.numpy() for clip in load_noise_clips(noise_dir, option="data.no_speech_dir")]
             if noise_dir else [])
    recipe = no_speech_recipe(count, durations, seed, [len(clip) for clip in clips] or None)
    labels = tokenizer("").input_ids  # the prefix, then <|endoftext|>
    fingerprint = _fingerprint(recipe, labels, seed, noise_dir)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if count == 0:
        return datasets.Dataset.from_dict({name: [] for name in PREPARED_FEATURES}, features=PREPARED_FEATURES)
    return cached_map(
        datasets.Dataset.from_dict(recipe),
        _no_speech_batch,
        cache_dir,
        f"no_speech-{fingerprint}",
        fingerprint,
        batched=True,
        with_indices=True,
        fn_kwargs={"labels": labels, "clips": clips, "seed": seed},
        remove_columns=list(recipe),
        features=PREPARED_FEATURES,
        desc="making no-speech rows",
    )


def _fingerprint(recipe: dict, labels: list[int], seed: int, noise_dir: str) -> str:
    """A hash of the recipe, the labels, the seed (the generated samples' draws) and the noise files' names, sizes
    and times."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": NO_SPEECH_VERSION, "prep_version": PREP_VERSION, "seed": seed,
                              "labels": labels, "recipe": recipe}, sort_keys=True).encode())
    if noise_dir:
        root = resolve_path(noise_dir)
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in NOISE_SUFFIXES and p.is_file()):
            stat = os.stat(path)
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def add_no_speech_rows(train: datasets.Dataset, fraction: float, noise_dir: str, seed: int, tokenizer,
                       report, cache_dir: str | Path = "") -> datasets.Dataset:
    """`train` followed by `no_speech_count` no-speech rows (lengths drawn from `train`'s), counted in `report`'s
    `no_speech`."""
    count = no_speech_count(len(train), fraction)
    if not count:
        return train
    rows = no_speech_rows(count, train["duration"], seed, tokenizer, noise_dir, cache_dir)
    report.no_speech = count
    return datasets.concatenate_datasets([train, rows])


def allow_empty_transcripts(generation_config) -> bool:
    """Lets generation end at once, after the forced prefix, so that a model taught by no-speech rows can give
    the empty transcript they teach. Whisper's generation config lists `<|endoftext|>` in `begin_suppress_tokens`
    (openai/whisper's `SuppressBlank` does the same): with it, the first generated token can never be the end, and
    even a model sure that nothing was said must say something. Saved with the model (`best/`), so evaluation and
    the demo decode alike. Returns whether the list changed."""
    suppressed = list(getattr(generation_config, "begin_suppress_tokens", None) or [])
    end = generation_config.eos_token_id
    kept = [token for token in suppressed if token != end]
    generation_config.begin_suppress_tokens = kept or None
    return kept != suppressed
