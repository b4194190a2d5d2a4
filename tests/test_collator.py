"""The speech seq2seq collator, on exact tensors."""

import numpy as np
import pytest
import torch

from loop.collator import SpeechSeq2SeqCollator

SOT, HI, TRANSCRIBE, NOTIMESTAMPS, EOT = 1, 2, 3, 4, 0


@pytest.fixture
def collator(processor):
    return SpeechSeq2SeqCollator(processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>"))


def row(labels, index=0, frames=1000, value=0.0, duration=1.5):
    return {"input_features": np.full((80, frames), value, dtype=np.float32), "labels": np.array(labels),
            "duration": np.float32(duration), "index": index}


def test_labels_padded_with_minus_100_and_start_token_stripped(processor, collator):
    tok = processor.tokenizer
    a = tok("नमस्ते दुनिया").input_ids
    b = tok("हाँ").input_ids
    batch = collator([row(a, 0), row(b, 1)])
    labels = batch["labels"]
    assert labels.dtype == torch.long
    assert labels.shape == (2, len(a) - 1)  # the start token is gone from every row
    assert labels[0].tolist() == a[1:]
    assert labels[1, : len(b) - 1].tolist() == b[1:]
    assert (labels[1, len(b) - 1:] == -100).all()
    # The final <|endoftext|> is a real target even though it equals the pad token id.
    assert labels[1, len(b) - 2].item() == tok.eos_token_id == tok.pad_token_id
    assert labels[0, 0].item() == tok.convert_tokens_to_ids("<|hi|>")


def test_start_token_kept_when_not_every_row_has_it(collator, processor):
    tok = processor.tokenizer
    a = tok("नमस्ते").input_ids
    without_start = a[1:]
    batch = collator([row(a, 0), row(without_start, 1)])
    assert batch["labels"][0, : len(a)].tolist() == a
    assert batch["labels"][1, : len(without_start)].tolist() == without_start
    assert batch["labels"][1, len(without_start):].tolist() == [-100]


def test_exact_tensors():
    collator = SpeechSeq2SeqCollator(SOT)
    rows = [row([SOT, HI, TRANSCRIBE, NOTIMESTAMPS, 7, 8, 9, EOT], 5, frames=4, value=1.0, duration=2.0),
            row([SOT, HI, TRANSCRIBE, NOTIMESTAMPS, 7, EOT], 9, frames=4, value=2.0, duration=0.5)]
    batch = collator(rows)
    expected = torch.tensor([[HI, TRANSCRIBE, NOTIMESTAMPS, 7, 8, 9, EOT],
                             [HI, TRANSCRIBE, NOTIMESTAMPS, 7, EOT, -100, -100]])
    assert torch.equal(batch["labels"], expected)
    assert batch["input_features"].shape == (2, 80, 4)
    assert batch["input_features"][1].unique().tolist() == [2.0]
    assert batch["durations"].tolist() == [2.0, 0.5]
    assert batch["index"].tolist() == [5, 9]


def test_features_stack_in_row_order(collator):
    batch = collator([row([1, 2], 0, value=0.5), row([1, 2], 1, value=-0.25)])
    assert batch["input_features"].shape == (2, 80, 1000)
    assert batch["input_features"].dtype == torch.float32
    assert batch["input_features"][0, 0, 0].item() == 0.5
    assert batch["input_features"][1, 79, 999].item() == -0.25


def test_rows_of_different_feature_shapes_are_named():
    collator = SpeechSeq2SeqCollator(SOT)
    with pytest.raises(ValueError, match=r"rows \[3, 4\] have features of different shapes"):
        collator([row([SOT, 7, EOT], 3, frames=10), row([SOT, 7, EOT], 4, frames=12)])

