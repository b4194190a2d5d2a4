"""Hallucination metrics on hand-made hypotheses: each flag fires on the failure it names and not on ordinary text."""

import zlib

import pytest

from loop.eval.hallucination import (
    COMPRESSION_RATIO_THRESHOLD,
    compression_ratio,
    hallucination_metrics,
    longest_repeat,
    utterance_flags,
    worst_hallucinations,
)

REFERENCE = "मैं कल सुबह बाज़ार जाऊँगा"


def test_compression_ratio_is_whispers_text_bytes_over_zlib_bytes():
    text = "यह एक वाक्य है"
    data = text.encode("utf-8")
    assert compression_ratio(text) == len(data) / len(zlib.compress(data))
    assert compression_ratio("") == 0.0
    assert compression_ratio(" ".join(["और"] * 20)) > COMPRESSION_RATIO_THRESHOLD > compression_ratio(REFERENCE)


def test_longest_repeat_finds_the_loop_and_its_length():
    assert longest_repeat(["a", "b", "c", "b", "c", "b", "c", "d"]) == (("b", "c"), 3)
    assert longest_repeat(["और", "और", "और", "और"]) == (("और",), 4)
    assert longest_repeat([]) == ((), 0)


def test_a_loop_is_flagged_but_ordinary_doubling_is_not():
    assert utterance_flags(REFERENCE, REFERENCE + " और और और").loop
    assert utterance_flags(REFERENCE, "मैं कल कल सुबह जाऊँगा").loop is False  # two in a row is speech
    looped = utterance_flags(REFERENCE, "बाज़ार जाऊँगा बाज़ार जाऊँगा बाज़ार जाऊँगा")
    assert looped.loop and looped.repeated == "बाज़ार जाऊँगा"


def test_a_repetition_the_reference_has_too_is_not_a_loop():
    spoken = "हाँ हाँ हाँ ठीक है"
    assert not utterance_flags(spoken, spoken).loop
    assert utterance_flags(spoken, "हाँ हाँ हाँ हाँ हाँ ठीक है").loop  # more than was said


def test_long_empty_and_clean_rows():
    clean = utterance_flags(REFERENCE, REFERENCE)
    assert not clean.any and clean.length_ratio == 1.0
    long = utterance_flags("दो शब्द", "यह वाक्य उस से कहीं लंबा है जो कहा गया")
    assert long.long and long.length_ratio == 5.0
    assert utterance_flags(REFERENCE, "").empty
    assert not utterance_flags("", "").empty and not utterance_flags("", "").long
    invented = utterance_flags("", "धन्यवाद")  # text over silence
    assert invented.long and invented.length_ratio == float("inf")


def test_corpus_metrics_count_each_failure_once_per_row():
    references = [REFERENCE, REFERENCE, REFERENCE, "", REFERENCE]
    hypotheses = [
        REFERENCE,                                    # clean
        REFERENCE + " " + " ".join(["और"] * 20),      # loop, long, compressible; 20 insertions
        "",                                           # empty; 5 deletions
        "धन्यवाद",                                     # invented over silence: 1 insertion, long
        "मैं कल सुबह बाज़ार जाऊँगा जाऊँगा",            # one insertion, no loop
    ]
    figures = hallucination_metrics(references, hypotheses)
    counts = figures["hallucination_counts"]
    assert counts == {"loop": 1, "long": 2, "compressible": 1, "empty": 1, "insertions": 22, "utterances": 5}
    assert figures["loop_share"] == pytest.approx(20.0)
    assert figures["long_share"] == pytest.approx(40.0)
    assert figures["empty_share"] == pytest.approx(20.0)
    assert figures["insertion_rate"] == pytest.approx(100.0 * 22 / 20)  # 4 spoken references of 5 words
    assert figures["reference_compressible_share"] == 0.0


def test_corpus_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        hallucination_metrics(["a", "b"], ["a"])


def test_worst_examples_put_loops_first_and_skip_clean_rows():
    predictions = [
        {"index": 0, "reference": REFERENCE, "hypothesis": REFERENCE},
        {"index": 1, "reference": "दो शब्द", "hypothesis": "यह वाक्य उस से कहीं लंबा है"},
        {"index": 2, "reference": REFERENCE, "hypothesis": "और और और और"},
    ]
    worst = worst_hallucinations(predictions)
    assert [row["index"] for row in worst] == [2, 1]
    assert worst[0]["flags"] == ["loop"]  # four words: short of the length and compression limits
    assert worst[0]["repeated"] == "और" and worst[1]["flags"] == ["long"]
