"""Corpus copies with bad rows, for the tests that reading and preparation skip, count and flag them: one builder,
`add_bad_rows`, behind the `broken_corpus` fixture (tests/conftest.py) and tests/test_bad_corpus.py.

A case is named `reason` or `reason:variant`, after the skip reason its row is counted under: `kept:...` rows are
odd but usable, and `implausible_duration` is skipped in training splits and kept, flagged, in evaluation.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

PROJECT = Path(__file__).resolve().parent.parent
BAD_ROWS_SPEAKER = "bad-rows-speaker"
READ_REASONS = ("duplicate_row", "bad_tsv_row")  # skipped while the TSV is read, before any audio is decoded

CASES = {
    "missing_clip": "a clip that is not there",
    "empty_audio": "a 0-byte file",
    "unreadable_audio": "4,000 random bytes",
    "too_long": "a 12-s WAV, over the tiny models' 5-s window",
    "empty_transcript": "a blank transcript",
    "empty_transcript:no_sentence_field": "a row that stops after its path (no sentence column)",
    "labels_too_long": "400 words: far over 256 label tokens",
    "duplicate_row": "the first good row again",
    "bad_tsv_row:extra_field": "one field too many",
    "bad_tsv_row:empty_path": "an empty path",
    "bad_tsv_row:invalid_utf8": "a transcript that is not UTF-8",
    "kept:truncated_mp3": "a shipped clip cut to 3,000 bytes: whole MP3 frames, 0.74 s, decodes fine",
    "kept:stereo_8k": "a 2-s stereo WAV at 8 kHz, mixed down and resampled",
    "implausible_duration": "a shipped clip cut to 300 bytes: 72 ms of audio under a three-word transcript",
}
SKIPPED = ("missing_clip", "empty_audio", "unreadable_audio", "too_long", "empty_transcript", "labels_too_long",
           "duplicate_row", "bad_tsv_row:extra_field", "bad_tsv_row:empty_path", "bad_tsv_row:invalid_utf8")
"""One row of every kind that is skipped in every split, in the `broken_corpus` fixture's order."""


def reason(case: str) -> str:
    """The skip reason a case's row is counted under in a training split ("" for a kept row)."""
    name = case.partition(":")[0]
    return "" if name == "kept" else name


@dataclass
class BadCorpus:
    """A corpus copy whose split files mix their good rows with one row of each case."""

    path: Path
    """The locale folder (train.tsv, dev.tsv, test.tsv, clips/)."""
    good: int
    """Good rows in each split written: all of them must be kept."""
    cases: tuple[str, ...]
    """The cases added to each split written, in file order."""
    rows: dict[str, int]
    """Line number (header = line 1) of each case's row, the same in every split written."""
    long_transcript: str
    """The transcript of the `labels_too_long` row."""

    @property
    def skips(self) -> dict[str, int]:
        """Skip counts by reason after preparation for training (with the tiny models: 5-s window, 256 tokens)."""
        return dict(Counter(reason(case) for case in self.cases if reason(case)))

    @property
    def read_skips(self) -> dict[str, int]:
        """Skip counts by reason after reading a split file (before any audio is decoded)."""
        return {name: count for name, count in self.skips.items() if name in READ_REASONS}

    @property
    def flagged(self) -> int:
        """Rows that a training split skips as implausible and an evaluation split keeps, flagged."""
        return sum(reason(case).startswith("implausible") for case in self.cases)

    @property
    def eval_skips(self) -> dict[str, int]:
        """Skip counts by reason after preparation for evaluation, which keeps implausible rows."""
        return {name: count for name, count in self.skips.items() if not name.startswith("implausible")}

    @property
    def total(self) -> int:
        """Rows of each split written, bad ones included."""
        return self.good + len(self.cases)


def add_bad_rows(folder: Path, cases: Sequence[str], splits: Sequence[str]) -> BadCorpus:
    """Rewrites `<folder>/<split>.tsv` for each of `splits` (a `corpus_copy` folder: its rows are the good ones,
    their clips in `clips/`): a good row, then one case's row, and so on, then the good rows left, so tests check
    row numbers and not just counts. Every split written must hold the same number of good rows."""
    clips = folder / "clips"
    long_transcript = " ".join((PROJECT / "assets" / "hindi_sentences.txt").read_text(encoding="utf-8").split()[:400])
    rows: dict[str, int] = {}
    sizes = set()
    for split in splits:
        lines = (folder / f"{split}.tsv").read_bytes().splitlines()
        header, good = lines[0], lines[1:]
        sizes.add(len(good))
        template = good[0].decode("utf-8").split("\t")
        body, remaining = [header], iter(good)
        for case in cases:
            good_row = next(remaining, None)
            if good_row is not None:
                body.append(good_row)
            body.append(_case_row(case, clips, template, good[0], long_transcript))
            rows[case] = len(body)
        body += list(remaining)
        (folder / f"{split}.tsv").write_bytes(b"\n".join(body) + b"\n")
    assert len(sizes) == 1, f"splits {splits} hold different numbers of good rows ({sizes})"
    return BadCorpus(folder, sizes.pop(), tuple(cases), rows, long_transcript)


def _row(template: list[str], clip: str, sentence: str) -> bytes:
    fields = list(template)
    fields[0], fields[1], fields[3] = BAD_ROWS_SPEAKER, clip, sentence
    return "\t".join(fields).encode("utf-8")


def _tone(path: Path, seconds: float, rate: int, channels: int = 1) -> None:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    soundfile.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate)


def _case_row(case: str, clips: Path, template: list[str], first_good: bytes, long_transcript: str) -> bytes:
    """The TSV line of one case, after writing the clip it needs (from the first good row's clip)."""
    shipped = (clips / template[1]).read_bytes()
    if case == "missing_clip":
        return _row(template, "missing.mp3", "यह फ़ाइल कहीं नहीं है।")
    if case == "empty_audio":
        (clips / "zero.mp3").write_bytes(b"")
        return _row(template, "zero.mp3", "यह फ़ाइल ख़ाली है।")
    if case == "unreadable_audio":
        (clips / "garbage.mp3").write_bytes(random.Random(0).randbytes(4000))
        return _row(template, "garbage.mp3", "यह फ़ाइल टूटी है।")
    if case == "too_long":
        _tone(clips / "long.wav", 12.0, 8000)
        return _row(template, "long.wav", "यह आवाज़ बहुत लंबी है।")
    if case == "empty_transcript":
        (clips / "blank.mp3").write_bytes(shipped)
        return _row(template, "blank.mp3", "   ")
    if case == "empty_transcript:no_sentence_field":
        (clips / "nosentence.mp3").write_bytes(shipped)
        return "\t".join([BAD_ROWS_SPEAKER, "nosentence.mp3"]).encode("utf-8")
    if case == "labels_too_long":
        (clips / "wordy.mp3").write_bytes(shipped)
        return _row(template, "wordy.mp3", long_transcript)
    if case == "duplicate_row":
        return first_good
    if case == "bad_tsv_row:extra_field":
        return _row(template, "extra.mp3", "एक खाना ज़्यादा।") + b"\textra"
    if case == "bad_tsv_row:empty_path":
        return _row(template, "", "रास्ता ख़ाली है।")
    if case == "bad_tsv_row:invalid_utf8":
        return _row(template, "latin1.mp3", "caf_").replace(b"caf_", b"caf\xe9")
    if case == "kept:truncated_mp3":
        (clips / "truncated.mp3").write_bytes(shipped[:3000])
        return _row(template, "truncated.mp3", "कटी हुई फ़ाइल।")
    if case == "kept:stereo_8k":
        _tone(clips / "stereo8k.wav", 2.0, 8000, channels=2)
        return _row(template, "stereo8k.wav", "दो चैनल की आवाज़।")
    if case == "implausible_duration":
        (clips / "cut300.mp3").write_bytes(shipped[:300])
        return _row(template, "cut300.mp3", "आधी कटी फ़ाइल।")
    raise ValueError(f"unknown bad-row case {case!r} (cases: {', '.join(CASES)})")
