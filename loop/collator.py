"""The speech seq2seq collator: a list of prepared rows -> one padded batch of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SpeechSeq2SeqCollator:
    """Pads features and labels of prepared rows (see `loop.data.prepare`) into a batch.

    Returns `input_features` (batch, n_mels, n_frames) float32, `labels` (batch, max_label_len) int64 with -100 at
    padded positions, `durations` (batch,) seconds and `index` (batch,) row positions.
    """

    processor: object
    decoder_start_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        # Features: the feature extractor pads to its fixed window (prepared rows already have it, so this is a
        # stack; it still pads rows from other sources correctly).
        batch = self.processor.feature_extractor.pad(
            {"input_features": [row["input_features"] for row in rows]}, return_tensors="pt"
        )
        # Labels: the tokenizer pads with <|endoftext|>, which is also the real end-of-text token, so padding is
        # found through the attention mask rather than by token id; the final <|endoftext|> must stay a target.
        padded = self.processor.tokenizer.pad(
            {"input_ids": [np.asarray(row["labels"]).tolist() for row in rows]}, return_tensors="pt"
        )
        # -100 is the index cross-entropy ignores: padded positions add nothing to the loss.
        labels = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), -100)
        # The model builds decoder inputs by shifting labels right and prepending <|startoftranscript|> itself;
        # if the labels kept theirs, the model would learn to predict it after itself. Strip it when every row has it.
        if labels.shape[1] > 0 and (labels[:, 0] == self.decoder_start_token_id).all():
            labels = labels[:, 1:]
        return {
            "input_features": batch["input_features"],
            "labels": labels.long(),
            "durations": torch.tensor([float(row["duration"]) for row in rows], dtype=torch.float32),
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
        }
