"""Hallucination metrics: the ways a fine-tuned Whisper says more than was said.

Word error rate hides them: a hypothesis that loops ("और और और और ...") or invents a sentence over silence costs
insertions, but a few such rows in a corpus barely move the WER while they are what users notice first. Each
metric here is a share of utterances (in percent) or a rate, computed from the texts alone, so it applies to the
loop's evaluation, `scripts/evaluate.py` and the guard sets alike:

- `insertion_rate`: inserted words over reference words, in percent (the I of WER on its own);
- `loop_share`: hypotheses that repeat an n-gram (n <= `LOOP_MAX_N`) at least `LOOP_MIN_REPEATS` times in a row,
  where the reference does not repeat it as often;
- `long_share`: hypotheses with more than `LENGTH_RATIO_THRESHOLD` times the reference's words;
- `compressible_share`: hypotheses whose zlib compression ratio exceeds `COMPRESSION_RATIO_THRESHOLD`, Whisper's
  own test for a looping segment (`whisper/utils.py`: text bytes over zlib-compressed bytes; faster-whisper uses
  the same 2.4). `reference_compressible_share` gives the same share over the references, the level a language's
  ordinary text reaches (Devanagari's UTF-8 bytes repeat more than Latin ones), so a rise above it is what counts;
- `empty_share`: empty hypotheses of non-empty references (the opposite failure, counted here because the same
  decoding options move it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

from loop.model.decoding_options import COMPRESSION_RATIO_THRESHOLD, compression_ratio

LENGTH_RATIO_THRESHOLD = 2.0  # hypothesis words over reference words above which a row is "much longer"
LOOP_MAX_N = 4  # longest n-gram searched for repetition
LOOP_MIN_REPEATS = 3  # "and and and": three in a row is a loop; two ("धीरे धीरे") is ordinary speech


def longest_repeat(words: Sequence[str], max_n: int = LOOP_MAX_N) -> tuple[tuple[str, ...], int]:
    """The n-gram (n <= max_n) repeated most often back to back in `words`, and how many times in a row it occurs;
    ((), 0) for no words. Ties go to the shorter n-gram."""
    best: tuple[tuple[str, ...], int] = ((), 0)
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            gram = tuple(words[start:start + n])
            repeats = 1
            while tuple(words[start + repeats * n:start + (repeats + 1) * n]) == gram:
                repeats += 1
            if repeats > best[1]:
                best = (gram, repeats)
    return best


def repeat_count(words: Sequence[str], gram: tuple[str, ...]) -> int:
    """Most back-to-back occurrences of `gram` in `words`."""
    n, most = len(gram), 0
    for start in range(len(words) - n + 1):
        repeats = 0
        while tuple(words[start + repeats * n:start + (repeats + 1) * n]) == gram:
            repeats += 1
        most = max(most, repeats)
    return most


@dataclass(frozen=True)
class Flags:
    """What is wrong with one hypothesis against its reference."""

    loop: bool
    long: bool
    compressible: bool
    empty: bool
    length_ratio: float
    """Hypothesis words over reference words (inf for words over an empty reference, 1.0 for both empty)."""
    compression_ratio: float
    repeated: str
    """The n-gram that loops, joined by spaces ("" when none does)."""

    @property
    def any(self) -> bool:
        return self.loop or self.long or self.compressible or self.empty


def utterance_flags(reference: str, hypothesis: str) -> Flags:
    ref_words, hyp_words = reference.split(), hypothesis.split()
    gram, repeats = longest_repeat(hyp_words)
    loop = repeats >= LOOP_MIN_REPEATS and repeat_count(ref_words, gram) < repeats
    if ref_words:
        length_ratio = len(hyp_words) / len(ref_words)
    else:
        length_ratio = float("inf") if hyp_words else 1.0
    ratio = compression_ratio(hypothesis)
    return Flags(
        loop=loop,
        long=length_ratio > LENGTH_RATIO_THRESHOLD,
        compressible=ratio > COMPRESSION_RATIO_THRESHOLD,
        empty=bool(ref_words) and not hyp_words,
        length_ratio=length_ratio,
        compression_ratio=ratio,
        repeated=" ".join(gram) if loop else "",
    )


def hallucination_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus figures in percent (see the module docstring) and their counts, for `metrics.json` and TensorBoard.
    Raises ValueError if the two sequences differ in length."""
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses")
    flags = [utterance_flags(r, h) for r, h in zip(references, hypotheses)]
    rows = max(len(flags), 1)
    reference_words = sum(len(r.split()) for r in references)
    insertions = 0
    if references:
        # jiwer refuses empty references one by one; an empty reference's words are all insertions.
        pairs = [(" ".join(r.split()), " ".join(h.split())) for r, h in zip(references, hypotheses)]
        spoken = [(r, h) for r, h in pairs if r]
        insertions = sum(len(h.split()) for r, h in pairs if not r)
        if spoken:
            insertions += jiwer.process_words([r for r, _ in spoken], [h for _, h in spoken]).insertions
    counts = {
        "loop": sum(f.loop for f in flags),
        "long": sum(f.long for f in flags),
        "compressible": sum(f.compressible for f in flags),
        "empty": sum(f.empty for f in flags),
    }
    reference_compressible = sum(compression_ratio(r) > COMPRESSION_RATIO_THRESHOLD for r in references)
    return {
        "insertion_rate": 100.0 * insertions / max(reference_words, 1),
        **{f"{name}_share": 100.0 * count / rows for name, count in counts.items()},
        "reference_compressible_share": 100.0 * reference_compressible / rows,
        "hallucination_counts": {**counts, "insertions": insertions, "utterances": len(flags)},
    }


def worst_hallucinations(predictions: Sequence[dict], limit: int = 10) -> list[dict]:
    """The flagged predictions (dicts with "reference" and "hypothesis", as the evaluation writes them), worst
    first: loops, then by length ratio, then by compression ratio. Each comes back with its flags added."""
    flagged = []
    for prediction in predictions:
        flags = utterance_flags(prediction["reference"], prediction["hypothesis"])
        if flags.any:
            flagged.append((flags, prediction))
    flagged.sort(key=lambda item: (not item[0].loop, -min(item[0].length_ratio, 1e9), -item[0].compression_ratio))
    return [
        {**prediction, "flags": [name for name in ("loop", "long", "compressible", "empty") if getattr(flags, name)],
         "length_ratio": flags.length_ratio, "compression_ratio": round(flags.compression_ratio, 3),
         "repeated": flags.repeated}
        for flags, prediction in flagged[:limit]
    ]
