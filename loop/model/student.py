"""A smaller Whisper made from a larger one by copying layers (distil-whisper's student initialisation).

The student keeps the teacher's width, embeddings, convolutions, final layer norms, tokenizer, processor, generation
config and token layout, and takes a subset of its transformer layers: all encoder layers (or a maximally spaced
subset), and maximally spaced decoder layers (first and last for two). Starting from copied layers rather than
random ones is what lets a 2-layer decoder approach the teacher after a short distillation: the first layer reads
the embeddings as the teacher's did, the last writes into the output space the tied embedding reads.

The result is an ordinary `save_pretrained` folder (`load_for_inference` and `model.name_or_path` take it); its
config.json records which teacher layers it was built from (`student_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from loop.model.loading import load_processor, load_weights


@dataclass(frozen=True)
class StudentLayers:
    """The teacher's layer numbers the student's layers copy, in order."""

    encoder: list[int]
    decoder: list[int]


def spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer numbers, as evenly spaced as whole numbers allow, always including the last (with
    `keep` >= 2 the first too): 2 of 6 -> [0, 5], 3 of 6 -> [0, 2, 5], 1 of 6 -> [5]."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers: choose 1 to {total}")
    if keep == 1:
        return [total - 1]  # the last layer writes what the output projection reads
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def choose_layers(config: WhisperConfig, decoder_layers: int, encoder_layers: int | None = None) -> StudentLayers:
    """The teacher layers a student with `decoder_layers` (and `encoder_layers`, None: all) copies."""
    encoder = (list(range(config.encoder_layers)) if encoder_layers is None
               else spaced_layers(config.encoder_layers, encoder_layers))
    return StudentLayers(encoder=encoder, decoder=spaced_layers(config.decoder_layers, decoder_layers))


def student_from_teacher(teacher: WhisperForConditionalGeneration, layers: StudentLayers) -> WhisperForConditionalGeneration:
    """A new model with the teacher's configuration but `layers`' layer counts, every weight copied from the
    teacher: layer i of the student's encoder (decoder) is layer `layers.encoder[i]` (`layers.decoder[i]`) of the
    teacher's, everything outside the layers as it is."""
    config = WhisperConfig.from_dict(teacher.config.to_dict())
    config.encoder_layers, config.decoder_layers = len(layers.encoder), len(layers.decoder)
    config.num_hidden_layers = config.encoder_layers
    student = WhisperForConditionalGeneration(config).to(teacher.dtype)
    source = teacher.state_dict()
    renumbered = {}
    for name in student.state_dict():
        renumbered[name] = source[teacher_name(name, layers)]
    student.load_state_dict(renumbered, strict=True)
    student.generation_config = teacher.generation_config.__class__.from_dict(teacher.generation_config.to_dict())
    if getattr(teacher.generation_config, "alignment_heads", None):
        student.generation_config.alignment_heads = kept_alignment_heads(teacher.generation_config.alignment_heads,
                                                                         layers.decoder)
    return student


def teacher_name(student_name: str, layers: StudentLayers) -> str:
    """The teacher's parameter name for one of the student's: `model.decoder.layers.1.fc1.weight` ->
    `model.decoder.layers.5.fc1.weight` when the second student layer copies teacher layer 5."""
    parts = student_name.split(".")
    for stack, chosen in (("encoder", layers.encoder), ("decoder", layers.decoder)):
        if len(parts) > 3 and parts[1] == stack and parts[2] == "layers":
            parts[3] = str(chosen[int(parts[3])])
    return ".".join(parts)


def kept_alignment_heads(heads, decoder_layers: list[int]):
    """The teacher's cross-attention heads that align text to audio (word timestamps read them), renumbered to
    the student's decoder layers; those in layers the student drops are gone, None when none is left."""
    if not heads:
        return heads
    position = {layer: i for i, layer in enumerate(decoder_layers)}
    kept = [[position[layer], head] for layer, head in heads if layer in position]
    return kept or None


def make_student(teacher_dir: str, output_dir: str | Path, decoder_layers: int = 2,
                 encoder_layers: int | None = None) -> tuple[Path, StudentLayers]:
    """Loads the teacher (a model folder or Hub id), builds its student and saves it, with the teacher's
    processor, to `output_dir`; returns the folder and the layers copied."""
    teacher = load_weights(teacher_dir)
    layers = choose_layers(teacher.config, decoder_layers, encoder_layers)
    student = student_from_teacher(teacher, layers)
    student.config.student_of = {"teacher": str(teacher_dir), "encoder_layers": layers.encoder,
                                 "decoder_layers": layers.decoder}
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output)
    load_processor(teacher_dir).save_pretrained(output)  # tokenizer, feature extractor: the token layout
    return output, layers


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
