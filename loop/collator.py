"""The speech seq2seq collator: a list of prepared rows -> one padded batch of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loop.loss import IGNORE_INDEX


@dataclass
class SpeechSeq2SeqCollator:
    """Stacks features and pads labels of prepared rows (see `loop.data.prepare`) into a batch.

    Returns `input_features` (batch, n_mels, n_frames) float32, `labels` (batch, max_label_len) int64 with -100 at
    padded positions, `durations` (batch,) seconds, `utterances` (batch,) utterances per row (more than 1 in
    packed training rows) and `index` (batch,) row positions.

    Every prepared row already holds the model's whole window of features, so this is one `np.stack` and one
    label array filled in place: no per-row conversion through the feature extractor or tokenizer.
    """

    decoder_start_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        shapes = {np.shape(row["input_features"]) for row in rows}
        if len(shapes) != 1:
            raise ValueError(
                f"rows {[int(row['index']) for row in rows]} have features of different shapes {sorted(shapes)}: "
                "prepare every row to the model's window with loop.data.prepare"
            )
        features = torch.from_numpy(np.stack([np.asarray(row["input_features"], dtype=np.float32) for row in rows]))
        # -100 is the index cross-entropy ignores: padded positions add nothing to the loss. Padding is placed by
        # length, not found by token id: the final <|endoftext|> equals the pad id and must stay a target.
        width = max(len(row["labels"]) for row in rows)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = row["labels"]
        # The model builds decoder inputs by shifting labels right and prepending <|startoftranscript|> itself;
        # if the labels kept theirs, the model would learn to predict it after itself. Strip it when every row has it.
        if width > 0 and (labels[:, 0] == self.decoder_start_token_id).all():
            labels = labels[:, 1:]
        return {
            "input_features": features,
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "durations": torch.tensor([float(row["duration"]) for row in rows], dtype=torch.float32),
            "utterances": torch.tensor([int(row.get("utterances", 1)) for row in rows], dtype=torch.long),
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
        }
