"""The speech seq2seq collator: a list of prepared rows -> one padded batch of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label positions that add nothing to the loss (padding); cross-entropy's ignore_index


@dataclass
class SpeechSeq2SeqCollator:
    """Pads the audio and labels of prepared rows (see `loop.data.prepare.prepare`) into a batch.

    Returns `audio` (batch, longest clip) float32 16-kHz samples, zero after each clip (the log-mel features are
    computed from it on the accelerator, `loop.model.features.LogMel`), `audio_lengths` (batch,) samples, `labels`
    (batch, max_label_len) int64 with -100 at padded positions, `durations` (batch,) seconds, `utterances` (batch,)
    utterances per row (more than 1 in packed training rows) and `index` (batch,) row positions.

    Rows hold int16 samples and a scale (`loop.data.audio.quantize`); they are scaled back here, in one array filled in
    place: no per-row conversion through the feature extractor or tokenizer.
    """

    decoder_start_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(row["audio"]) for row in rows]
        audio = np.zeros((len(rows), max(lengths, default=0)), dtype=np.float32)
        for i, row in enumerate(rows):
            np.multiply(row["audio"], np.float32(row["audio_scale"]), out=audio[i, : lengths[i]], casting="unsafe")
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
            "audio": torch.from_numpy(audio),
            "audio_lengths": torch.tensor(lengths, dtype=torch.long),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "durations": torch.tensor([float(row["duration"]) for row in rows], dtype=torch.float32),
            "utterances": torch.tensor([int(row.get("utterances", 1)) for row in rows], dtype=torch.long),
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
        }
