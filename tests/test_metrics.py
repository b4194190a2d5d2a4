"""Tests for loop.eval.metrics: expected values are counted by hand in the comments."""

import unicodedata
from collections import Counter

import pytest
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from loop.eval.metrics import (
    aligned_ops,
    alignment_counts,
    compute_metrics,
    error_rates,
    normalize_indic,
    normalizer_for,
    utterance_error_rates,
)


@pytest.mark.parametrize("word", ["हैं", "हिंदी", "चाँद", "क्या", "दुःख", "ज़रूर"])
def test_normalize_indic_keeps_words_with_marks(word):
    assert normalize_indic(word) == unicodedata.normalize("NFC", word)


@pytest.mark.parametrize(
    "mark",
    [chr(c) for c in range(0x093E, 0x094D)]  # vowel signs (matras)
    + ["\u094d", "\u0902", "\u0901", "\u0903", "\u093c"],  # virama, anusvara, chandrabindu, visarga, nukta
)
def test_normalize_indic_keeps_every_devanagari_mark(mark):
    assert normalize_indic("क" + mark) == "क" + mark


def test_normalize_indic_removes_punctuation():
    assert normalize_indic("नमस्ते। आप कैसे हैं॥") == "नमस्ते आप कैसे हैं"
    assert normalize_indic('"क्या," उसने पूछा?') == "क्या उसने पूछा"
    assert normalize_indic("“हाँ”… (नहीं)—शायद [ठीक] 'है'!") == "हाँ नहीं शायद ठीक है"


def test_normalize_indic_applies_nfc():
    assert normalize_indic("\u0928\u093c") == "\u0929"  # न + nukta composes to ऩ
    assert normalize_indic("cafe\u0301") == "café"


def test_normalize_indic_unifies_nukta_forms():
    # Canonical form is base + U+093C: NFC decomposes the precomposed U+0958..U+095F.
    for precomposed in map(chr, range(0x0958, 0x0960)):
        decomposed = unicodedata.decomposition(precomposed).split()
        expected = "".join(chr(int(c, 16)) for c in decomposed)
        assert normalize_indic(precomposed) == normalize_indic(expected) == expected
    assert normalize_indic("\u0958") == normalize_indic("\u0915\u093c")
    assert normalize_indic("\u095b\u0930\u0942\u0930") == normalize_indic("\u091c\u093c\u0930\u0942\u0930")  # ज़रूर


def test_normalize_indic_collapses_whitespace_and_lowercases_latin():
    assert normalize_indic("  एक \t दो\n\n तीन  ") == "एक दो तीन"
    assert normalize_indic("Delhi मेट्रो") == "delhi मेट्रो"
    assert normalize_indic("") == ""


def test_whisper_basic_normalizer_hides_hain_vs_hai_but_ours_counts_it():
    references, hypotheses = ["वे यहाँ हैं"], ["वे यहाँ है"]
    basic = BasicTextNormalizer()
    # The bug: Whisper's normalizer strips all combining marks, so हैं and है both become ह.
    assert error_rates([basic(r) for r in references], [basic(h) for h in hypotheses])["wer"] == 0.0
    metrics = compute_metrics(references, hypotheses, language="hi")
    assert metrics["normalized_wer"] == pytest.approx(100 / 3)  # 1 substitution in 3 words
    # Characters: वे(2) + space + यहाँ(4) + space + हैं(3) = 11; hypothesis lacks one anusvara.
    assert metrics["normalized_cer"] == pytest.approx(100 / 11)


def test_error_rates_counts_substitution_deletion_insertion():
    # a=a b→x c=c d deleted | e=e f=f g inserted: S=1 D=1 I=1 over N=4+2 words.
    rates = error_rates(["a b c d", "e f"], ["a x c", "e f g"])
    assert rates["wer"] == 50.0
    # Characters: "a b c d" vs "a x c" is 1 substitution + 2 deletions (" d") over 7;
    # "e f" vs "e f g" is 2 insertions (" g") over 3: 5 / 10.
    assert rates["cer"] == 50.0


def test_cer_counts_spaces_as_characters():
    assert error_rates(["abcd"], ["abd"]) == {"wer": 100.0, "cer": 25.0}  # 1 deletion of 4 chars
    # A dropped space: 1 deletion over 5 chars; words: ab→abcd substituted, cd deleted.
    assert error_rates(["ab cd"], ["abcd"]) == {"wer": 100.0, "cer": 20.0}
    # Extra whitespace is collapsed before counting, so it costs nothing.
    assert error_rates(["ab cd"], ["  ab   cd "]) == {"wer": 0.0, "cer": 0.0}


def test_error_rates_is_corpus_level_not_mean_of_utterances():
    references, hypotheses = ["a", "b c d e"], ["x", "b c d e"]
    per_utterance = [utterance_error_rates(r, h)[0] for r, h in zip(references, hypotheses)]
    assert per_utterance == [100.0, 0.0]  # mean would be 50
    assert error_rates(references, hypotheses)["wer"] == 20.0  # 1 error / 5 words


def test_corpus_wer_equals_total_edits_over_total_reference_words():
    references = ["one two three", "four five", "six", "seven eight nine ten"]
    hypotheses = ["one too three extra", "five", "six six", "seven ate nine"]
    counts = alignment_counts(references, hypotheses)
    edits = counts["num_substitutions"] + counts["num_deletions"] + counts["num_insertions"]
    num_words = sum(len(r.split()) for r in references)
    assert counts["hits"] + counts["num_substitutions"] + counts["num_deletions"] == num_words == 10
    assert error_rates(references, hypotheses)["wer"] == pytest.approx(100 * edits / num_words)


def test_error_rates_handles_empty_references_and_hypotheses():
    # Empty reference: its hypothesis word is an insertion against the corpus' 4 words / 7 chars.
    assert error_rates(["", "a b c d"], ["x", "a b c d"]) == pytest.approx({"wer": 25.0, "cer": 100 / 7})
    assert error_rates(["", " "], ["", ""]) == {"wer": 0.0, "cer": 0.0}
    assert error_rates([], []) == {"wer": 0.0, "cer": 0.0}
    assert error_rates(["a b"], [""]) == {"wer": 100.0, "cer": 100.0}
    # No reference words at all: jiwer's convention, the insertion count (2 words, 3 chars).
    assert utterance_error_rates("", "a b") == (200.0, 300.0)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        compute_metrics(["a"], [], language="hi")
    with pytest.raises(ValueError):
        alignment_counts(["a"], ["a", "b"])


def test_compute_metrics_raw_and_normalized():
    metrics = compute_metrics(["नमस्ते, दुनिया।"], [" नमस्ते  दुनिया "], language="hindi")
    assert set(metrics) == {"wer", "cer", "normalized_wer", "normalized_cer"}
    assert metrics["wer"] == 100.0  # both words differ by their punctuation
    assert metrics["cer"] == pytest.approx(100 * 2 / 15)  # "," and "।" deleted of 15 chars
    assert metrics["normalized_wer"] == metrics["normalized_cer"] == 0.0


def test_normalizer_for_languages():
    for language in ("en", "English", "EN"):
        assert isinstance(normalizer_for(language), EnglishTextNormalizer)
        assert normalizer_for(language)("Hello, World!") == "hello world"
    for language in ("hi", "hindi", "HI", "Hindi", "mr", "ta", None):
        assert normalizer_for(language) is normalize_indic
    for language in ("fr", "french", "de", "castilian"):
        assert isinstance(normalizer_for(language), BasicTextNormalizer)
    # Whisper's basic normalizer can leave a trailing space; error_rates collapses whitespace.
    assert normalizer_for("french")("Ça va, Élodie?").split() == ["ça", "va", "élodie"]


def test_aligned_ops():
    assert aligned_ops("the cat sat", "the bat sat down") == [
        ("equal", "the", "the"),
        ("substitute", "cat", "bat"),
        ("equal", "sat", "sat"),
        ("insert", None, "down"),
    ]
    assert aligned_ops("a dog", "dog") == [("delete", "a", None), ("equal", "dog", "dog")]
    assert aligned_ops("", "") == []


def test_alignment_counts():
    counts = alignment_counts(["the cat sat", "a dog", "the cat"], ["the bat sat down", "dog", "the bat"])
    assert counts == {
        "substitutions": Counter({("cat", "bat"): 2}),
        "deletions": Counter({"a": 1}),
        "insertions": Counter({"down": 1}),
        "hits": 4,
        "num_substitutions": 2,
        "num_deletions": 1,
        "num_insertions": 1,
    }
