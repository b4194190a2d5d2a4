"""Token cross-entropy of a batch, shared by the training step and the evaluation loss.

The model is called with decoder inputs rather than `labels`: given labels, Whisper computes a mean loss of its
own over the whole vocabulary, which the loop would throw away (it needs sums to weight micro-batches and rows
exactly). No KV cache is built either: the whole target sequence is scored in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from loop.data.collator import IGNORE_INDEX


def token_losses(model, batch: dict, encoder_outputs=None, cache=None) -> torch.Tensor:
    """(batch, label_length) cross-entropy of every target token, 0 at padded positions. With `encoder_outputs`
    (the encoder's output for `batch["input_features"]`) the encoder is not run again. With `cache` (an empty
    `EncoderDecoderCache`) the pass leaves the cross-attention keys and values of the encoder output in it, for
    generation to reuse."""
    logits = decoder_logits(model, batch, encoder_outputs, cache)
    return label_cross_entropy(logits, batch["labels"])


def decoder_logits(model, batch: dict, encoder_outputs=None, cache=None) -> torch.Tensor:
    """(batch, label_length, vocabulary) logits of every target position, the labels fed in shifted right
    (teacher forcing); `encoder_outputs` and `cache` as for `token_losses`."""
    config = getattr(model, "module", model).config  # DistributedDataParallel keeps the model in .module
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    inputs = {"encoder_outputs": encoder_outputs} if encoder_outputs is not None else {"input_features": batch["input_features"]}
    caching = {"use_cache": False} if cache is None else {"use_cache": True, "cache": cache}
    return model(**inputs, decoder_input_ids=decoder_input_ids, **caching).logits


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, label_length) cross-entropy of `labels` under `logits`, in float32, 0 where a label is -100."""
    # Over (batch x length, vocabulary) rows: over (batch, vocabulary, length) torch picks nll_loss2d, whose CUDA
    # kernel is not deterministic (`train.deterministic` would raise at the first step). Same values.
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view_as(labels)
