"""scripts/evaluate.py on the shipped corpus: its files agree with each other, --compare and --html, clear errors,
and one decoding on three paths (the loop's evaluation, evaluate.py, the demo) for the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from loop.eval.hallucination import hallucination_metrics, utterance_flags
from loop.eval.metrics import error_rates
from loop.eval.saved_model import DecodeOverrides, same_preparation
from loop.model.loading import load_for_inference
from tests.helpers import DECODE_MAX_LENGTH, PROJECT, child_env, run_evaluate_script, script_command
from tests.reference import read_predictions_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")
SAMPLES = 8


@pytest.fixture(scope="module")
def data_args(corpus_dir, session_cache_dir):
    return ["--data.path", corpus_dir, "--data.eval_split", "test", f"--data.max_eval_samples={SAMPLES}",
            f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, decoding_checkpoint, tiny_model_dir, data_args):
    """One run with --compare (the shipped tiny model: another window and vocabulary, so the same utterances are
    prepared again for it) and --html. --eval.generation_max_length keeps the tiny model's decoding short."""
    out = tmp_path_factory.mktemp("evaluated")
    code = run_evaluate_script("--model", decoding_checkpoint, *data_args, "--output_dir", out, "--compare",
                               tiny_model_dir, "--html", f"--eval.generation_max_length={DECODE_MAX_LENGTH}",
                               "--batch_size=5")
    assert code == 0
    return out


def test_writes_consistent_metrics_predictions_and_report(evaluated, decoding_checkpoint):
    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    rows = read_predictions_jsonl(evaluated / "predictions.jsonl")
    assert metrics["num_utterances"] == len(rows) == SAMPLES
    assert metrics["num_skipped"] == 0 and metrics["skipped"] == {} and metrics["num_read"] == SAMPLES
    recomputed = error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    assert metrics["wer"] == pytest.approx(recomputed["wer"]) and metrics["cer"] == pytest.approx(recomputed["cer"])
    assert {"normalized_wer", "normalized_cer", "loss", "seconds"} <= set(metrics)
    assert metrics["model"] == str(decoding_checkpoint) and metrics["split"] == "test"
    assert metrics["decoding"] == {"language": "hi", "task": "transcribe", "num_beams": 1,
                                   "max_length": DECODE_MAX_LENGTH, "encoder_window": "full"}
    assert [r["index"] for r in rows] == list(range(SAMPLES))
    assert all(r["hypothesis"] and os.path.isfile(r["audio_path"]) and 1 < r["duration"] < 5 for r in rows)
    assert len({r["hypothesis"] for r in rows}) > 1  # the checkpoint says something different for each clip
    report = (evaluated / "report.md").read_text(encoding="utf-8")
    assert f"| WER % | {metrics['wer']:.2f} |" in report and "## WER by duration" in report
    # Hallucination figures and language ID, from the same decoding as the WER.
    recounted = hallucination_metrics([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    for key in ("insertion_rate", "loop_share", "long_share", "compressible_share", "empty_share"):
        assert metrics[key] == pytest.approx(recounted[key]), key
    assert metrics["hallucination_counts"] == recounted["hallucination_counts"]
    assert 0 <= metrics["language_id"] <= 100 and all(r["detected_language"] for r in rows)
    assert metrics["language_id"] == pytest.approx(100 * sum(r["detected_language"] == "hi" for r in rows) / len(rows))
    flagged = [r["id"] for r in rows if utterance_flags(r["reference"], r["hypothesis"]).any]
    assert sorted(w["id"] for w in metrics["worst_hallucinations"]) == sorted(flagged)[:10] or len(flagged) > 10


def test_compare_writes_both_models(evaluated, tiny_model_dir):
    metrics = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    second = metrics["compare"]
    assert second["model"] == str(tiny_model_dir) and second["num_utterances"] == SAMPLES
    # the command line's max length overrides the tiny model's saved 256
    assert second["decoding"]["max_length"] == DECODE_MAX_LENGTH
    rows = read_predictions_jsonl(evaluated / "predictions.jsonl")
    other = read_predictions_jsonl(evaluated / "compare_predictions.jsonl")
    assert [r["id"] for r in other] == [r["id"] for r in rows]  # the same utterances, in the same order
    recomputed = error_rates([r["reference"] for r in other], [r["hypothesis"] for r in other])
    assert second["wer"] == pytest.approx(recomputed["wer"])
    report = (evaluated / "report.md").read_text(encoding="utf-8")
    assert f"| WER % | {metrics['wer']:.2f} | {second['wer']:.2f} |" in report
    assert "## Where the two models differ most" in report


def test_html_report_embeds_the_audio(evaluated):
    page = (evaluated / "report.html").read_text(encoding="utf-8")
    assert page.rsplit("<table>", 1)[1].count("<audio controls") == SAMPLES and "data:audio/mpeg;base64," in page
    assert f"Audio embedded for {SAMPLES} of {SAMPLES} utterances" in page  # 8 short clips: within the 50 MB default
    assert "hypothesis (B)" in page


def test_one_decoding_three_paths(evaluated, decoding_checkpoint, corpus_dir, session_cache_dir):
    """The same checkpoint gives the same hypotheses through the training loop's final evaluation (finish():
    from_pretrained, the loop's test loader, evaluate), scripts/evaluate.py and the demo's transcribe_file."""
    from accelerate import Accelerator
    from transformers import WhisperForConditionalGeneration

    from loop.config.loading import load_config
    from loop.data.splits import PreparedData, build_eval_split
    from loop.eval.evaluation import evaluate
    from loop.model.features import LogMel
    from loop.model.loading import load_processor
    from loop.ship.demo import Transcriber
    from loop.train import get_dataloaders

    config = load_config(None, [f"--model.name_or_path={decoding_checkpoint}", f"--data.path={corpus_dir}",
                                f"--data.max_eval_samples={SAMPLES}", f"--data.cache_dir={session_cache_dir}",
                                "--eval.per_device_eval_batch_size=3"])
    accelerator = Accelerator(mixed_precision="no")  # its state is reset after the test (conftest.py)
    processor = load_processor(str(decoding_checkpoint), config.model.language, config.model.task)
    best = WhisperForConditionalGeneration.from_pretrained(decoding_checkpoint)
    table, _ = build_eval_split(config, processor, best.config.max_target_positions)
    _, _, test_loader = get_dataloaders(config, PreparedData(table, table, table, "test", {}), best)
    best, test_loader = accelerator.prepare_model(best, evaluation_mode=True), accelerator.prepare(test_loader)
    loop_result = evaluate(best, test_loader, accelerator, processor.tokenizer, table["text"],
                           config.model.language, log_mel=LogMel(processor.feature_extractor), description="test")
    from_loop = {table["id"][p["index"]]: p["hypothesis"] for p in loop_result.predictions}
    from_script = {r["id"]: r["hypothesis"] for r in read_predictions_jsonl(evaluated / "predictions.jsonl")}
    demo = Transcriber(decoding_checkpoint)
    from_demo = {r["id"]: demo.transcribe_file(r["audio_path"])[0]
                 for r in read_predictions_jsonl(evaluated / "predictions.jsonl")}
    assert len(from_loop) == SAMPLES
    assert from_loop == from_script
    assert from_script == from_demo


def one_line_error(capsys) -> str:
    """The error message: one line, the last one written to stderr (progress bars may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_errors_exit_2_with_one_line(tmp_path, decoding_checkpoint, data_args, capsys):
    out = ["--output_dir", tmp_path / "out"]
    assert run_evaluate_script("--model", tmp_path / "nowhere", *data_args, *out) == 2  # ConfigError
    assert "does not exist" in one_line_error(capsys)
    assert run_evaluate_script("--model", decoding_checkpoint, *data_args, "--data.eval_split", "nosuch", *out) == 2
    assert "split 'nosuch' not found" in one_line_error(capsys)  # DataError
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert run_evaluate_script("--model", broken, *data_args, *out) == 2  # ModelLoadError
    assert "cannot load" in one_line_error(capsys)
    if not __import__("torch").cuda.is_available():
        assert run_evaluate_script("--model", decoding_checkpoint, *data_args, "--mixed_precision", "fp16", *out) == 2
        assert "needs a GPU" in one_line_error(capsys)
    assert run_evaluate_script("--model", decoding_checkpoint, *data_args, "--language", "klingon", *out) == 2
    assert "not a Whisper language" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_decoding_follows_the_model_folder_unless_overridden(decoding_checkpoint, tiny_model_dir):
    model, processor = load_for_inference(str(decoding_checkpoint))
    settings = model.generation_config
    assert (settings.language, settings.task, settings.max_length) == ("hi", "transcribe", DECODE_MAX_LENGTH)
    overrides = DecodeOverrides.from_command_line(
        "english", None, 3, ["--eval.generation_max_length=40", "--model.task=translate", "--data.path=x"])
    assert overrides == DecodeOverrides(language="english", task="translate", num_beams=3, max_length=40)
    model, processor = load_for_inference(str(decoding_checkpoint), language="english", task="translate", num_beams=3,
                                          max_length=40)
    settings = model.generation_config
    assert (settings.language, settings.task, settings.num_beams, settings.max_length) == ("en", "translate", 3, 40)
    assert processor.tokenizer.prefix_tokens[1] == processor.tokenizer.convert_tokens_to_ids("<|en|>")
    assert DecodeOverrides.from_command_line(None, None, None, ["--data.path=x"]) == DecodeOverrides()
    translating = load_for_inference(str(decoding_checkpoint), language="english", task="translate")[1]
    assert same_preparation(processor, translating)
    assert not same_preparation(processor, load_for_inference(str(tiny_model_dir))[1])


def test_two_processes_give_the_single_process_result(tmp_path, decoding_checkpoint, data_args, evaluated):
    """accelerate launch with 2 CPU processes (gloo): every utterance once, the same hypotheses and metrics."""
    command = script_command("evaluate", "--model", decoding_checkpoint, *data_args, "--output_dir", tmp_path / "two",
                             "--batch_size=3", processes=2)
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((evaluated / "metrics.json").read_text(encoding="utf-8"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    assert two["num_processes"] == 2 and two["num_utterances"] == one["num_utterances"] == SAMPLES
    for key in ("wer", "cer", "normalized_wer", "normalized_cer"):
        assert two[key] == one[key]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    single = read_predictions_jsonl(evaluated / "predictions.jsonl")
    double = read_predictions_jsonl(tmp_path / "two" / "predictions.jsonl")
    assert [(r["id"], r["hypothesis"]) for r in double] == [(r["id"], r["hypothesis"]) for r in single]
    assert done.stdout.count(" on test (") == 1  # only the main process prints the summary


def test_one_encoder_pass_decodes_as_generate_does(decoding_checkpoint):
    """evaluate() runs the encoder once for the loss and generation, and generation reuses the cross-attention keys
    and values the loss pass computed; either way generate gives the ids it computes from the features itself,
    greedy and with beam search, and the loss equals the one Whisper computes from labels."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from loop.data.audio import decode_audio, quantize
    from loop.data.collator import SpeechSeq2SeqCollator
    from loop.model.decoding import generate_ids, shares_cross_attention
    from loop.model.loss import token_losses
    from tests.helpers import corpus_rows

    rows = corpus_rows("test")[:4]
    for beams in (1, 3):
        model, processor = load_for_inference(str(decoding_checkpoint), num_beams=beams)
        assert shares_cross_attention(model.generation_config) == (beams == 1)
        waveforms = [decode_audio(row["audio_path"]) for row in rows]
        features = processor.feature_extractor(waveforms, sampling_rate=16000, return_tensors="pt").input_features
        batch = SpeechSeq2SeqCollator(model.config.decoder_start_token_id)([
            {"audio": samples, "audio_scale": scale, "labels": processor.tokenizer(row["text"]).input_ids,
             "duration": 1.0, "index": i} for i, ((samples, scale), row) in enumerate(zip(map(quantize, waveforms), rows))])
        batch["input_features"] = features
        with torch.no_grad():
            encoder_outputs = model.get_encoder()(features)
            shared = generate_ids(model, features, encoder_outputs)
            assert encoder_outputs.last_hidden_state.shape[0] == len(rows)  # beams did not repeat rows in place
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            ours = token_losses(model, batch, encoder_outputs, cache)
            assert cache.cross_attention_cache.get_seq_length() == features.shape[-1] // 2  # the encoder positions
            reused = generate_ids(model, features, encoder_outputs, cache.cross_attention_cache)
            separate = generate_ids(model, features)
            whisper = model(input_features=batch["input_features"], labels=batch["labels"]).loss
        assert torch.equal(shared, separate) and torch.equal(reused, separate)
        assert len(set(processor.tokenizer.batch_decode(shared, skip_special_tokens=True))) > 1  # not one empty string
        mask = batch["labels"].ne(-100)
        torch.testing.assert_close(ours, token_losses(model, batch, encoder_outputs), rtol=1e-5, atol=1e-6)
        assert torch.allclose(ours.sum() / mask.sum(), whisper, rtol=1e-5)
        assert (ours[~mask] == 0).all() and (ours[mask] > 0).all()
