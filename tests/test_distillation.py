"""Distillation: a student made of the teacher's layers, the distillation loss and its gradient, training a student
against a frozen teacher in the loop (loss falls, resume is bitwise), and the student as assistant model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loop.model.loading import load_for_inference
from loop.model.student import choose_layers, spaced_layers
from loop.model.tiny import build_tiny_whisper
from tests.helpers import PROJECT, corpus_rows, load_script
from tests.test_determinism import threads_and_determinism_restored  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A tiny Whisper with 4 encoder and 4 decoder layers (5-s window), so a student has layers to leave out."""
    sentences = [row["text"] for split in ("train", "dev") for row in corpus_rows(split)]
    return build_tiny_whisper(sentences, tmp_path_factory.mktemp("deep-teacher"), vocab_size=600, chunk_length_s=5,
                              d_model=64, layers=4, heads=2, max_target_positions=128, seed=3)


@pytest.fixture
def processor_batch(deep_teacher):
    """Factory: a batch of two corpus sentences for `model` (the deep teacher's tokenizer), random features of its
    window, labels as the collator makes them (start token stripped, padding -100)."""
    from loop.model.loading import load_processor

    tokenizer = load_processor(str(deep_teacher), "hindi", "transcribe").tokenizer

    def make(model) -> dict:
        ids = [tokenizer(row["text"]).input_ids[1:] for row in corpus_rows("train")[:2]]
        width = max(map(len, ids))
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
        frames = model.config.max_source_positions * 2
        features = torch.randn(2, model.config.num_mel_bins, frames, generator=torch.Generator().manual_seed(1))
        return {"labels": labels, "input_features": features}

    return make


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


def test_the_kl_gradient_is_the_hand_computed_one():
    """d(T^2 KL(p_t || p_s)) / d z_s = T (softmax(z_s / T) - softmax(z_t / T)) at every unmasked position, 0 at
    masked ones; and the loss itself matches KL written out from its definition."""
    from loop.model.distillation import kl_token_losses

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    temperature = 2.0
    losses = kl_token_losses(student, teacher, labels, temperature)
    p_s, p_t = (student / temperature).softmax(-1), (teacher / temperature).softmax(-1)
    by_definition = temperature ** 2 * (p_t * (p_t.log() - p_s.log())).sum(-1) * labels.ne(-100)
    torch.testing.assert_close(losses.double(), by_definition.detach(), rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    expected = temperature * (p_s - p_t).detach() * labels.ne(-100).unsqueeze(-1)
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-6)
    assert student.grad[0, 3:].abs().sum() == 0 and student.grad[0, :3].abs().sum() > 0


def test_the_kl_term_is_zero_against_the_same_model(deep_teacher, processor_batch):
    """Teacher = student at T=1: the KL term of every token is 0 (to float32 rounding), so the loss is alpha_ce x
    cross-entropy; against another model it is positive at every target token."""
    from loop.model.distillation import Distillation, distillation_token_losses
    from loop.model.loss import token_losses

    model, _ = load_for_inference(str(deep_teacher))
    batch = processor_batch(model)
    kl_only = distillation_token_losses(model, batch, Distillation(model, alpha_ce=0, alpha_kl=1, temperature=1))
    assert kl_only.abs().max() < 1e-5
    combined = distillation_token_losses(model, batch, Distillation(model, alpha_ce=0.5, alpha_kl=1, temperature=1))
    torch.testing.assert_close(combined, 0.5 * token_losses(model, batch), rtol=1e-4, atol=1e-5)
    other = load_for_inference(str(deep_teacher))[0]
    with torch.no_grad():
        other.model.decoder.layers[0].fc1.weight.mul_(3)
    kl = distillation_token_losses(model, batch, Distillation(other, alpha_ce=0, alpha_kl=1, temperature=2))
    targets = batch["labels"].ne(-100)
    assert bool((kl[targets] > 0).all()) and bool((kl[~targets] == 0).all())


@pytest.fixture(scope="module")
def student_of_deep_teacher(tmp_path_factory, deep_teacher):
    """The deep teacher's 2-decoder-layer student (all 4 encoder layers)."""
    from loop.model.student import make_student

    return make_student(str(deep_teacher), tmp_path_factory.mktemp("student") / "student", decoder_layers=2)[0]


def distillation_run(tmp_path, student, teacher, cache_dir, name, *overrides):
    """A run of the student on 16 utterances of the shipped corpus (a manifest), distilled from `teacher`."""
    from loop.data.sources import write_manifest
    from tests.helpers import run_config

    manifest = tmp_path / "manifest"
    if not manifest.exists():
        write_manifest(manifest / "train.csv", corpus_rows("train")[:16])
    return run_config(
        tmp_path / name, student, cache_dir, "--data.source=manifest", f"--data.path={manifest}",
        "--data.train_splits=train", "--data.eval_split=train", "--eval.select_on=test", "--data.max_eval_samples=4",
        f"--train.distill_from={teacher}", "--train.per_device_train_batch_size=8", "--train.learning_rate=3e-3",
        "--train.report_to=tensorboard", "--model.dropout=0", "--model.apply_spec_augment=false",
        "--eval.generation_max_length=16", "--eval.per_device_eval_batch_size=8", *overrides,
    )


def test_a_distillation_run_trains_the_student_and_its_loss_falls(tmp_path, student_of_deep_teacher, deep_teacher,
                                                                  session_cache_dir):
    """The loop with a teacher (the student's encoder frozen: one encoder pass for both): the loss (CE + KL)
    falls, the teacher is untouched and in no checkpoint, best/ is the 2-layer student."""
    from loop.train import train
    from tests.helpers import tensorboard_scalars

    config = distillation_run(tmp_path, student_of_deep_teacher, deep_teacher, session_cache_dir, "run",
                              "--train.max_steps=24", "--eval.eval_steps=24", "--train.save_steps=24",
                              "--train.distill_alpha_ce=0.5", "--train.distill_temperature=1.5",
                              "--model.freeze_encoder=true")
    train(config)
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    assert losses[24] < losses[1] * 0.75, (losses[1], losses[24])
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_24" / "model.safetensors"))
    assert sum(1 for name in saved if ".decoder.layers." in name and name.endswith("fc1.weight")) == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_24").glob("model*.safetensors")) == [
        "model.safetensors"]
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["decoder_layers"] == 2
    teacher = load_file(str(deep_teacher / "model.safetensors"))
    fresh = load_file(str(deep_teacher / "model.safetensors"))
    assert all(torch.equal(teacher[k], fresh[k]) for k in teacher)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, student_of_deep_teacher, session_cache_dir):
    from loop.model.loading import ModelLoadError
    from loop.train import setup

    config = distillation_run(tmp_path, student_of_deep_teacher, PROJECT / "assets" / "tiny-whisper-hi",
                              session_cache_dir, "refused", "--train.max_steps=1")
    with pytest.raises(ModelLoadError, match="train.distill_from .* cannot work with this model"):
        setup(config)


@pytest.mark.slow  # three short runs with a teacher: minutes on 2 busy cores
@pytest.mark.usefixtures("threads_and_determinism_restored")
def test_distillation_resumes_bitwise(tmp_path, student_of_deep_teacher, deep_teacher, session_cache_dir):
    """train.deterministic, accumulation 2, packed rows and the dynamic window: 8 steps straight == 4 steps, a
    stop, a resume (the teacher loaded again) and 4 more; the same losses and weights, bit for bit."""
    from loop.run.checkpoints import list_checkpoints
    from loop.train import fit, setup
    from tests.helpers import StopAt, reset_accelerate, tensorboard_scalars

    common = ("--train.max_steps=8", "--train.save_steps=4", "--eval.eval_steps=8", "--train.deterministic=true",
              "--train.per_device_train_batch_size=4", "--train.gradient_accumulation_steps=2",
              "--data.pack_to_seconds=5", "--model.encoder_window=dynamic")
    run = setup(distillation_run(tmp_path, student_of_deep_teacher, deep_teacher, session_cache_dir, "straight",
                                 *common))
    assert fit(run) == ""
    reset_accelerate()
    config = distillation_run(tmp_path, student_of_deep_teacher, deep_teacher, session_cache_dir, "resumed", *common)
    run = setup(config)
    assert fit(run, StopAt(run, 4)) == "SIGTERM"
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [4]
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 4 and run.distillation is not None
    assert fit(run) == ""
    straight = tensorboard_scalars(tmp_path / "straight", "train/loss")
    assert sorted(straight) == list(range(1, 9))
    assert tensorboard_scalars(tmp_path / "resumed", "train/loss") == straight
    final = [load_file(str(tmp_path / name / "checkpoints" / "step_8" / "model.safetensors"))
             for name in ("straight", "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.fixture(scope="module")
def assistant_of_decoding_checkpoint(tmp_path_factory, decoding_checkpoint):
    """A 1-decoder-layer student of the decoding checkpoint, as the assistant (untrained: it drafts badly, which
    tests the teacher's corrections)."""
    from loop.model.student import make_student

    return make_student(str(decoding_checkpoint), tmp_path_factory.mktemp("assistant") / "assistant", 1)[0]


def features_of(model, processor, rows):
    """(features, durations) of `rows` for `model` at its window, as evaluation makes them."""
    from loop.data.audio import SAMPLE_RATE, decode_audio
    from loop.model.encoder_window import batch_features
    from loop.model.features import LogMel, pad_waveforms

    waveforms = [torch.tensor(decode_audio(row["audio_path"])) for row in rows]
    audio, _ = pad_waveforms(waveforms)
    seconds = torch.tensor([len(w) / SAMPLE_RATE for w in waveforms])
    return batch_features(model, LogMel(processor.feature_extractor), audio), seconds


@pytest.mark.parametrize("window", ["full", "dynamic"])
def test_assisted_decoding_equals_plain_greedy_decoding(decoding_checkpoint, assistant_of_decoding_checkpoint,
                                                        window):
    """Speculative decoding with the student as assistant gives the teacher's plain greedy tokens, token for token,
    at the full and the dynamic window, from features or from the encoder's output, with the duration cap on; also
    when the teacher's first choice is a begin-suppressed token (Whisper's generate drops `begin_suppress_tokens`
    with an assistant; `assisted_ids` puts them back)."""
    from loop.model.decoding import assisted_ids, generate_ids

    teacher, processor = load_for_inference(str(decoding_checkpoint), encoder_window=window)
    assistant, _ = load_for_inference(str(assistant_of_decoding_checkpoint), encoder_window=window)
    features, seconds = features_of(teacher, processor, corpus_rows("test")[:6])
    plain = generate_ids(teacher, features)
    assert len({tuple(row) for row in plain.tolist()}) == 6  # six different hypotheses
    assert torch.equal(assisted_ids(teacher, assistant, features), plain)
    encoded = teacher.get_encoder()(features)
    assert torch.equal(assisted_ids(teacher, assistant, features, encoded), plain)
    teacher.generation_config.max_new_tokens_per_second = 3.0  # a cap that ends some rows early
    capped = generate_ids(teacher, features, seconds=seconds)
    assert not torch.equal(capped, plain)
    assert torch.equal(assisted_ids(teacher, assistant, features, seconds=seconds), capped)
    teacher.generation_config.max_new_tokens_per_second = None
    teacher.generation_config.begin_suppress_tokens = sorted({*teacher.generation_config.begin_suppress_tokens,
                                                              int(plain[0, 0])})
    suppressed = generate_ids(teacher, features)
    assert int(suppressed[0, 0]) != int(plain[0, 0])
    assert torch.equal(assisted_ids(teacher, assistant, features), suppressed)


def test_evaluate_script_with_an_assistant_gives_the_same_transcripts(tmp_path, decoding_checkpoint,
                                                                      assistant_of_decoding_checkpoint, corpus_dir,
                                                                      session_cache_dir):
    """scripts/evaluate.py --eval.assistant_model: the same predictions and WER as plain decoding, the assistant
    named in metrics.json; an assistant with another tokenizer is refused with the option named."""
    from tests.helpers import run_evaluate_script
    from tests.reference import read_predictions_jsonl

    data = ["--data.path", str(corpus_dir), "--data.eval_split", "test", "--data.max_eval_samples=8",
            f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1", "--batch_size=4"]
    assert run_evaluate_script("--model", decoding_checkpoint, *data, "--output_dir", tmp_path / "plain") == 0
    assert run_evaluate_script("--model", decoding_checkpoint, *data, "--output_dir", tmp_path / "assisted",
                               f"--eval.assistant_model={assistant_of_decoding_checkpoint}") == 0
    plain, assisted = (read_predictions_jsonl(tmp_path / name / "predictions.jsonl") for name in ("plain", "assisted"))
    assert [row["hypothesis"] for row in assisted] == [row["hypothesis"] for row in plain]
    assert any(row["hypothesis"] for row in plain)
    metrics = json.loads((tmp_path / "assisted" / "metrics.json").read_text())
    assert metrics["decoding"]["assistant_model"] == str(assistant_of_decoding_checkpoint)
    counts = metrics["speculative"]  # how well the assistant drafted, summed over the rows
    assert counts["tokens"] >= counts["model_passes"] > 0 and 0 <= counts["accepted"] <= counts["drafted"]
    assert metrics["wer"] == json.loads((tmp_path / "plain" / "metrics.json").read_text())["wer"]
    code = run_evaluate_script("--model", decoding_checkpoint, *data, "--output_dir", tmp_path / "refused",
                               f"--eval.assistant_model={PROJECT / 'assets' / 'tiny-whisper-hi'}")
    assert code == 2


def test_the_demo_with_an_assistant_gives_the_same_transcripts(decoding_checkpoint, assistant_of_decoding_checkpoint,
                                                               corpus_dir):
    pytest.importorskip("gradio")
    from loop.ship.demo import Transcriber

    plain, assisted = Transcriber(decoding_checkpoint), Transcriber(decoding_checkpoint,
                                                                    assistant_model=str(assistant_of_decoding_checkpoint))
    assert assisted.assistant is not None
    for row in corpus_rows("test")[:3]:
        assert assisted.transcribe_file(row["audio_path"])[0] == plain.transcribe_file(row["audio_path"])[0]


def test_a_frozen_copied_encoder_runs_once_for_both(deep_teacher, student_of_deep_teacher, processor_batch):
    """A student whose encoder is the teacher's, frozen, without dropout or SpecAugment, takes the teacher's encoder
    output: the same losses and gradients as running its own encoder. Not shared once it differs, trains, or
    masks its input."""
    from loop.config import ModelConfig
    from loop.model.distillation import Distillation, distillation_token_losses, shares_encoder
    from loop.model.loading import load_model

    teacher, _ = load_for_inference(str(deep_teacher))
    student, _ = load_model(ModelConfig(name_or_path=str(student_of_deep_teacher), freeze_encoder=True))
    assert shares_encoder(student, teacher)
    batch = processor_batch(student)
    results = []
    for shared in (False, True):
        student.zero_grad()
        losses = distillation_token_losses(student, batch, Distillation(teacher, shared_encoder=shared))
        losses.sum().backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and not any(n.startswith("model.encoder.") for n in results[0][1])
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    unfrozen, _ = load_model(ModelConfig(name_or_path=str(student_of_deep_teacher)))
    masking, _ = load_model(ModelConfig(name_or_path=str(student_of_deep_teacher), freeze_encoder=True,
                                        apply_spec_augment=True))
    assert not shares_encoder(unfrozen, teacher) and not shares_encoder(masking, teacher)
    with torch.no_grad():
        student.model.encoder.layers[0].fc1.weight.mul_(2)
    assert not shares_encoder(student, teacher)


def test_speculative_decoding_shares_the_encoder_and_keeps_good_drafts(decoding_checkpoint,
                                                                       assistant_of_decoding_checkpoint):
    """A student with the teacher's encoder never encodes (the teacher's encoder output serves both); a student
    whose encoder differs encodes once per batch and still gives the teacher's tokens; the teacher as its own
    assistant has every draft kept, so it runs far fewer passes than it produces tokens; a generation setting
    speculative decoding cannot reproduce is refused by name."""
    from loop.model.decoding import assisted_ids, generate_ids
    from loop.model.speculative import DraftCounts

    teacher, processor = load_for_inference(str(decoding_checkpoint))
    assistant, _ = load_for_inference(str(assistant_of_decoding_checkpoint))
    features, _ = features_of(teacher, processor, corpus_rows("test")[:4])
    plain = generate_ids(teacher, features)
    encoder_runs = []
    assistant.get_encoder().register_forward_hook(lambda *_: encoder_runs.append(1))
    counts = DraftCounts()
    assert torch.equal(assisted_ids(teacher, assistant, features, counts=counts), plain)
    assert encoder_runs == [] and counts.tokens >= plain.shape[1]
    assert counts.model_passes > counts.tokens / 2  # an untrained student: most drafts rejected
    with torch.no_grad():
        assistant.get_encoder().layer_norm.bias.add_(0.01)
    assert torch.equal(assisted_ids(teacher, assistant, features), plain)
    assert encoder_runs == [1]
    itself = DraftCounts()
    assert torch.equal(assisted_ids(teacher, teacher, features, counts=itself), plain)
    assert itself.accepted >= itself.drafted - 4 and itself.model_passes * 3 <= itself.tokens
    teacher.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty=1.3"):
        assisted_ids(teacher, assistant, features)
