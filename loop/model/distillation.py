"""Knowledge distillation: the model being trained (the student) learns from the labels and from a frozen teacher's
token distributions at once (`train.distill_from`; distil-whisper's objective, Hinton et al.'s soft targets).

Per target token t (the non-padding label positions, the same ones cross-entropy counts):

    loss_t = alpha_ce * CE(label_t | student) + alpha_kl * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

The T^2 keeps the soft targets' gradient on the scale of the hard one's: d KL / d z_student = (p_s - p_t) / T at
temperature T, so without it a higher temperature would quietly shrink the distillation term. The loss is returned
per token, unreduced, so the training step sums it and scales it by the step's token count exactly as it does
cross-entropy alone (`optimizer_step` in loop/train.py): the same update for any split of the step into
micro-batches and processes.

The teacher is run on the student's own batch (same features, same teacher-forced decoder inputs) under no_grad,
in eval mode (no dropout: a resumed deterministic run recomputes the very same targets), and its logits live only
for the micro-batch: nothing of the teacher is stored or checkpointed, so a resume loads it again from its folder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from loop.data.collator import IGNORE_INDEX
from loop.model.loading import load_companion
from loop.model.loss import decoder_logits, label_cross_entropy, token_losses
from loop.model.speculative import same_encoder_weights


@dataclass
class Distillation:
    """A frozen teacher and the weights of the two terms (`train.distill_*`)."""

    teacher: torch.nn.Module
    alpha_ce: float = 0.8
    alpha_kl: float = 1.0
    temperature: float = 2.0
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """The mixed-precision context the student runs under (`accelerator.autocast`), for the teacher's forward."""
    shared_encoder: bool = False
    """The student's encoder is the teacher's, frozen, without dropout or SpecAugment (`shares_encoder`): its
    output is the teacher's, so the encoder runs once per micro-batch for both."""


def kl_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(batch, label_length) T^2 * KL(teacher || student) of the softened distributions at every position, 0 where
    the label is -100 (padding, and the prompt positions the collator masks). Logits (batch, label_length,
    vocabulary), computed in float32."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return (temperature ** 2) * kl.masked_fill(labels.eq(IGNORE_INDEX), 0.0)


def distillation_token_losses(model, batch: dict, distillation: Distillation) -> torch.Tensor:
    """(batch, label_length) alpha_ce * CE + alpha_kl * T^2 * KL per target token of `batch` (with its
    `input_features`), 0 at padded positions; the gradient reaches the student only."""
    encoder_outputs = None
    with torch.no_grad(), distillation.autocast():
        if distillation.shared_encoder:
            encoder_outputs = distillation.teacher.get_encoder()(batch["input_features"])
        teacher_logits = decoder_logits(distillation.teacher, batch, encoder_outputs)
    student_logits = decoder_logits(model, batch, encoder_outputs)
    losses = kl_token_losses(student_logits, teacher_logits, batch["labels"], distillation.temperature)
    return distillation.alpha_ce * label_cross_entropy(student_logits, batch["labels"]) + distillation.alpha_kl * losses


def training_token_losses(model, batch: dict, distillation: Distillation | None = None) -> torch.Tensor:
    """The training step's per-token loss: cross-entropy, or the distillation loss when there is a teacher."""
    if distillation is None:
        return token_losses(model, batch)
    return distillation_token_losses(model, batch, distillation)


def build_distillation(config, model, processor, accelerator) -> Distillation | None:
    """`train.distill_from`'s teacher (`config`: the `RunConfig`) for the student `model` and its `processor`, on
    the accelerator's device, under its precision (not `accelerator.prepare`d: the teacher would then be saved in
    every checkpoint); None without a teacher."""
    t, m = config.train, config.model
    if not t.distill_from:
        return None
    teacher = load_teacher(t.distill_from, model, processor.tokenizer, encoder_window=m.encoder_window,
                           attn_implementation=m.attn_implementation, device=accelerator.device)
    shared = shares_encoder(model, teacher)
    accelerator.print(f"distilling from {t.distill_from}: {t.distill_alpha_ce:g} x CE + {t.distill_alpha_kl:g} x "
                      f"T^2 KL at T={t.distill_temperature:g}" + ("; one encoder pass for both" if shared else ""))
    return Distillation(teacher, t.distill_alpha_ce, t.distill_alpha_kl, t.distill_temperature, accelerator.autocast,
                        shared)


def shares_encoder(student, teacher) -> bool:
    """Whether the student's encoder output is bound to equal the teacher's: its encoder frozen
    (`model.freeze_encoder`), with no dropout or SpecAugment in training, and its weights the teacher's, bit for
    bit (a student of `scripts/make_student.py` with all encoder layers)."""
    config, encoder = student.config, student.get_encoder()
    randomness = (config.dropout, config.attention_dropout, config.activation_dropout)
    if any(p.requires_grad for p in encoder.parameters()) or any(randomness) or config.apply_spec_augment:
        return False
    return same_encoder_weights(student, teacher)


def load_teacher(name_or_path: str, student, tokenizer, *, encoder_window: str = "full",
                 attn_implementation: str = "sdpa", device: torch.device | str = "cpu") -> torch.nn.Module:
    """The teacher (`loop.model.loading.load_companion`: the student's tokens and input), frozen (no parameter
    requires a gradient), in eval mode, on `device`, in float32 (the student's mixed precision applies to its
    forward through `Distillation.autocast`)."""
    teacher = load_companion(name_or_path, student, tokenizer, "train.distill_from", encoder_window=encoder_window,
                             attn_implementation=attn_implementation, device=device)
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher.eval()
