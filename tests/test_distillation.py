"""Distillation: a student made of the teacher's layers, the distillation loss and its gradient, training a student
against a frozen teacher in the loop (loss falls, resume is bitwise), and the student as assistant model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loop.model.loading import load_for_inference
from loop.model.student import choose_layers, make_student, spaced_layers
from loop.model.tiny import build_tiny_whisper
from tests.helpers import corpus_rows, load_script

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A tiny Whisper with 4 encoder and 4 decoder layers (5-s window), so a student has layers to leave out."""
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    return build_tiny_whisper(sentences, tmp_path_factory.mktemp("deep-teacher"), vocab_size=600, chunk_length_s=5,
                              d_model=64, layers=4, heads=2, max_target_positions=128, seed=3)


def test_layers_are_maximally_spaced():
    assert spaced_layers(6, 2) == [0, 5] and spaced_layers(32, 2) == [0, 31]
    assert spaced_layers(6, 3) == [0, 2, 5] and spaced_layers(12, 4) == [0, 4, 7, 11]
    assert spaced_layers(6, 1) == [5] and spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot keep 7 of 6 layers"):
        spaced_layers(6, 7)


@pytest.mark.parametrize("encoder_layers", [None, 2])
def test_the_students_layers_are_the_teachers_chosen_ones(tmp_path, deep_teacher, encoder_layers):
    """Every weight of the student equals the teacher weight it was copied from: its decoder layers 0 and 1 are the
    teacher's 0 and 3, its encoder layers all of the teacher's (or 0 and 3); embeddings, convolutions and norms as
    they are; tokenizer, feature extractor and generation config unchanged. The folder loads as a stock Whisper."""
    args = ["--teacher", deep_teacher, "--decoder_layers", "2", "--output", tmp_path / "student"]
    args += ["--encoder_layers", str(encoder_layers)] if encoder_layers else []
    assert load_script("make_student").main([str(a) for a in args]) == 0
    teacher, student = load_file(str(deep_teacher / "model.safetensors")), load_file(str(tmp_path / "student" / "model.safetensors"))
    encoder = [0, 3] if encoder_layers else [0, 1, 2, 3]
    expected = {}
    for name in teacher:
        parts = name.split(".")
        if parts[2] == "layers":
            chosen = encoder if parts[1] == "encoder" else [0, 3]
            if int(parts[3]) not in chosen:
                continue
            parts[3] = str(chosen.index(int(parts[3])))
        expected[".".join(parts)] = teacher[name]
    assert student.keys() == expected.keys()
    assert all(torch.equal(student[name], expected[name]) for name in student)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"]) == (len(encoder), 2)
    assert config["student_of"]["decoder_layers"] == [0, 3] and config["student_of"]["encoder_layers"] == encoder
    model, processor = load_for_inference(str(tmp_path / "student"))
    teacher_model, teacher_processor = load_for_inference(str(deep_teacher))
    assert model.generation_config.to_dict() == teacher_model.generation_config.to_dict()
    assert processor.tokenizer.get_vocab() == teacher_processor.tokenizer.get_vocab()
    assert processor.tokenizer.prefix_tokens == teacher_processor.tokenizer.prefix_tokens
    assert processor.feature_extractor.to_dict() == teacher_processor.feature_extractor.to_dict()


def test_alignment_heads_follow_the_kept_layers(deep_teacher):
    from loop.model.student import kept_alignment_heads

    assert choose_layers(load_for_inference(str(deep_teacher))[0].config, 2).decoder == [0, 3]
    assert kept_alignment_heads([[1, 0], [3, 1], [3, 0]], [0, 3]) == [[1, 1], [1, 0]]
    assert kept_alignment_heads([[1, 0]], [0, 3]) is None


def test_make_student_refuses_more_layers_than_the_teacher_has(tmp_path, deep_teacher, capsys):
    code = load_script("make_student").main(["--teacher", str(deep_teacher), "--decoder_layers", "5",
                                             "--output", str(tmp_path / "s")])
    assert code == 2 and "cannot keep 5 of 4 layers" in capsys.readouterr().err
