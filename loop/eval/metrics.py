"""Word and character error rates, computed with jiwer (never `evaluate`, which downloads metric code).

All rates are corpus-level percentages: total edits over total reference words (or characters), so
one long utterance weighs more than a short one, as in the Whisper papers. Character error rate
counts spaces as characters, as jiwer does.

Whisper's own `BasicTextNormalizer` deletes every combining mark, so for Devanagari it erases vowel
signs and virama: "हैं" and "है" both become "ह" and a model is not charged for the difference.
`normalize_indic` removes only punctuation and keeps the marks.
"""

import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from loop.languages import language_code

# Latin-script languages that Whisper's basic normalizer (lowercase, drop symbols, keep letters
# composed with their accents by NFKC) handles well; English has its own normalizer.
LATIN_LANGUAGES = frozenset(
    "af ca cs cy da de es et eu fi fr ga gl hr hu id is it lt lv ms mt nl nn no pl pt ro sk sl sq sv sw tl tr vi".split()
)


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def normalize_indic(text: str) -> str:
    """Normalizes text in any script without touching its combining marks.

    Steps: cased letters are lowercased (Latin, and any other cased script); Unicode NFC;
    punctuation and symbols (categories P* and S*: danda ।, double danda ॥, quotes, dashes,
    ellipsis, brackets, ASCII punctuation) become spaces; whitespace is collapsed and stripped.
    Devanagari vowel signs, virama, anusvara, chandrabindu, visarga and nukta (category M) are kept.

    Nukta letters: the canonical form is base consonant + U+093C (e.g. "क़" is U+0915 U+093C).
    NFC produces it for both spellings, because the precomposed U+0958..U+095F have canonical
    decompositions and are composition exclusions: NFC decomposes them and never recomposes them.
    """
    text = unicodedata.normalize("NFC", text.lower())
    return _collapse_whitespace("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text))


@lru_cache(maxsize=None)
def normalizer_for(language: str | None) -> Callable[[str], str]:
    """Returns the text normalizer for `language`, an ISO code ("hi") or Whisper name ("hindi").

    English gets Whisper's `EnglishTextNormalizer` with an empty British-to-American spelling map
    (the tokenizer's map is a Hub download), so "colour" and "color" still differ. The Latin-script
    languages in `LATIN_LANGUAGES` get Whisper's `BasicTextNormalizer`. Every other language,
    Hindi included, and None get `normalize_indic`.
    """
    code = language_code(language or "")
    if code == "en":
        return EnglishTextNormalizer({})
    if code in LATIN_LANGUAGES:
        return BasicTextNormalizer()
    return normalize_indic


def _process_words(references: Sequence[str], hypotheses: Sequence[str]) -> jiwer.WordOutput:
    """Runs one jiwer word alignment over the corpus, after collapsing whitespace."""
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; pass one hypothesis per reference")
    return jiwer.process_words(
        [_collapse_whitespace(r) for r in references], [_collapse_whitespace(h) for h in hypotheses]
    )


def _rate(output: jiwer.WordOutput | jiwer.CharacterOutput) -> float:
    """(S + D + I) / N in percent. With no reference tokens at all (N = 0), jiwer's convention:
    the insertion count itself, so empty references with empty hypotheses give 0.0."""
    errors = output.substitutions + output.deletions + output.insertions
    num_reference = output.hits + output.substitutions + output.deletions
    return 100.0 * errors / max(num_reference, 1)


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus-level {"wer", "cer"} in percent; whitespace is collapsed first, nothing else changes.

    An empty reference is allowed: its hypothesis words count as insertions against the rest of
    the corpus. Raises ValueError if the two sequences differ in length.
    """
    words = _process_words(references, hypotheses)
    # Reuse the collapsed text jiwer kept, so CER sees single spaces between words.
    chars = jiwer.process_characters([" ".join(r) for r in words.references], [" ".join(h) for h in words.hypotheses])
    return {"wer": _rate(words), "cer": _rate(chars)}


def utterance_error_rates(reference: str, hypothesis: str) -> tuple[float, float]:
    """(wer, cer) of one utterance in percent, with the conventions of `error_rates`."""
    rates = error_rates([reference], [hypothesis])
    return rates["wer"], rates["cer"]


def compute_metrics(references: Sequence[str], hypotheses: Sequence[str], language: str | None) -> dict:
    """{"wer", "cer"} on the text as written and {"normalized_wer", "normalized_cer"} after
    `normalizer_for(language)`; all corpus-level percentages, unrounded."""
    normalize = normalizer_for(language)
    raw = error_rates(references, hypotheses)
    normalized = error_rates([normalize(r) for r in references], [normalize(h) for h in hypotheses])
    return {**raw, "normalized_wer": normalized["wer"], "normalized_cer": normalized["cer"]}


def _word_ops(words: jiwer.WordOutput, index: int) -> list[tuple[str, str | None, str | None]]:
    ref, hyp, ops = words.references[index], words.hypotheses[index], []
    for chunk in words.alignments[index]:
        ref_words = ref[chunk.ref_start_idx : chunk.ref_end_idx]
        hyp_words = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        if chunk.type in ("equal", "substitute"):  # Levenshtein pairs these one to one
            ops += [(chunk.type, r, h) for r, h in zip(ref_words, hyp_words)]
        elif chunk.type == "delete":
            ops += [("delete", r, None) for r in ref_words]
        else:
            ops += [("insert", None, h) for h in hyp_words]
    return ops


def aligned_ops(reference: str, hypothesis: str) -> list[tuple[str, str | None, str | None]]:
    """Word alignment of one utterance, in order, as (op, ref_word, hyp_word) with op one of
    "equal", "substitute", "delete" (hyp_word None) or "insert" (ref_word None)."""
    return _word_ops(_process_words([reference], [hypothesis]), 0)


def alignment_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Word-level error analysis over a corpus: which words are substituted by which, deleted or
    inserted, and how often, plus the corpus totals jiwer reports."""
    words = _process_words(references, hypotheses)
    substitutions, deletions, insertions = Counter(), Counter(), Counter()
    for index in range(len(words.alignments)):
        for op, ref_word, hyp_word in _word_ops(words, index):
            if op == "substitute":
                substitutions[(ref_word, hyp_word)] += 1
            elif op == "delete":
                deletions[ref_word] += 1
            elif op == "insert":
                insertions[hyp_word] += 1
    return {
        "substitutions": substitutions,
        "deletions": deletions,
        "insertions": insertions,
        "hits": words.hits,
        "num_substitutions": words.substitutions,
        "num_deletions": words.deletions,
        "num_insertions": words.insertions,
    }
