"""The speech seq2seq collator, on exact tensors."""

import numpy as np
import pytest
import torch

from loop.data.collator import SpeechSeq2SeqCollator

SOT, HI, TRANSCRIBE, NOTIMESTAMPS, EOT = 1, 2, 3, 4, 0


@pytest.fixture
def collator(processor):
    return SpeechSeq2SeqCollator(processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>"))


def row(labels, index=0, samples=1000, value=0, scale=1 / 32767, duration=1.5):
    """A prepared row as the loader reads it: int16 audio and its scale (loop.data.audio.quantize)."""
    return {"audio": np.full(samples, value, dtype=np.int16), "audio_scale": np.float32(scale),
            "labels": np.array(labels), "duration": np.float32(duration), "index": index}


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
    rows = [row([SOT, HI, TRANSCRIBE, NOTIMESTAMPS, 7, 8, 9, EOT], 5, samples=4, value=2, scale=0.5, duration=2.0),
            row([SOT, HI, TRANSCRIBE, NOTIMESTAMPS, 7, EOT], 9, samples=3, value=-4, scale=0.5, duration=0.5)]
    batch = collator(rows)
    expected = torch.tensor([[HI, TRANSCRIBE, NOTIMESTAMPS, 7, 8, 9, EOT],
                             [HI, TRANSCRIBE, NOTIMESTAMPS, 7, EOT, -100, -100]])
    assert torch.equal(batch["labels"], expected)
    assert torch.equal(batch["audio"], torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, 0.0]]))
    assert batch["audio_lengths"].tolist() == [4, 3]
    assert batch["durations"].tolist() == [2.0, 0.5]
    assert batch["index"].tolist() == [5, 9]


def test_audio_is_scaled_back_and_zero_padded_in_row_order(collator):
    """int16 samples times their row's scale, each row zero after its clip (LogMel relies on that)."""
    batch = collator([row([1, 2], 0, samples=5, value=16384, scale=2 / 32767), row([1, 2], 1, samples=8, value=-3)])
    assert batch["audio"].shape == (2, 8) and batch["audio"].dtype == torch.float32
    assert batch["audio"][0, :5].tolist() == pytest.approx([16384 * 2 / 32767] * 5)
    assert batch["audio"][0, 5:].tolist() == [0.0, 0.0, 0.0]
    assert batch["audio"][1].tolist() == pytest.approx([-3 / 32767] * 8)
    assert batch["audio_lengths"].tolist() == [5, 8]
