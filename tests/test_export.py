"""scripts/export.py: the tiny multilingual Whisper of tests/export_models.py exported to CTranslate2 (float32 and
int8), loaded by faster-whisper, and checked against the transformers model on the shipped test split; a 128-mel
model; best/ converted by hand with ct2-transformers-converter; the export folder's own snippet run as written;
and every bad input refused with one line that names it."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loop.config.loading import load_config
from loop.data.audio import decode_audio
from loop.ship.parity import read_clips
from loop.ship.runtimes import run_parity
from tests.export_models import build_multilingual_tiny_whisper, run_export
from tests.helpers import CORPUS, child_env, corpus_rows

pytestmark = pytest.mark.usefixtures("single_thread")
CLIPS = 4  # of the shipped test split, the first in its TSV order


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_multilingual_tiny_whisper(tmp_path_factory.mktemp("multilingual") / "best")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="module")
def float32_export(model_dir, cache_dir, tmp_path_factory) -> tuple[int, Path]:
    output = tmp_path_factory.mktemp("exports") / "ct2-float32"
    rc = run_export("--model", model_dir, "--quantization", "float32", "--output_dir", output,
                    "--parity_clips", CLIPS, f"--data.cache_dir={cache_dir}")
    return rc, output


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_float32_export_is_a_faster_whisper_folder(float32_export, model_dir):
    from faster_whisper import WhisperModel

    rc, output = float32_export
    assert rc == 0
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json",
            "export.json", "README.md", "parity.json"} <= {p.name for p in output.iterdir()}
    assert not list(output.parent.glob(".tmp-*"))  # the staging folder is gone
    assert read_json(output / "preprocessor_config.json")["feature_size"] == 80
    generation = read_json(model_dir / "generation_config.json")
    converted = read_json(output / "config.json")
    assert converted["suppress_ids"] == generation["suppress_tokens"]
    assert converted["suppress_ids_begin"] == generation["begin_suppress_tokens"]
    assert converted["lang_ids"] == sorted(generation["lang_to_id"].values())
    assert converted["alignment_heads"] == [[1, 0], [1, 1]]  # none saved: the decoder's last half of layers
    assert read_json(output / "export.json")["quantization"] == "float32"
    whisper = WhisperModel(str(output), device="cpu", cpu_threads=1)
    assert whisper.model.is_multilingual and whisper.model.n_mels == 80
    assert whisper.feature_extractor.mel_filters.shape[0] == 80 and whisper.feature_extractor.nb_max_frames == 3000


def test_float32_parity_is_exact(float32_export):
    _, output = float32_export
    report = read_json(output / "parity.json")
    assert report["quantization"] == "float32" and report["split"] == "test" and report["num_clips"] == CLIPS
    assert report["failures"] == [] and report["passed"] and report["exact"]
    assert not (output / "FAILED").exists()
    transformers, exported = report["transformers"], report["faster_whisper"]
    assert set(exported["hallucination"]) >= {"insertion_rate", "loop_share", "empty_share"}
    assert exported["identical"] == CLIPS and exported["identical_share"] == 1.0
    assert exported["wer"] == transformers["wer"] and exported["cer"] == transformers["cer"]
    assert report["wer_difference"] == 0.0 and transformers["wer"] > 0
    references = [row["text"] for row in corpus_rows("test")[:CLIPS]]
    assert [clip["reference"] for clip in report["clips"]] == references
    # Every clip decodes to its own text, so identical transcripts are not identical by accident.
    assert len({clip["transformers"] for clip in report["clips"]}) == CLIPS
    settings = report["settings"]
    assert settings["language"] == "hi" and settings["num_beams"] == 1 and settings["temperature"] == 0.0
    assert settings["max_new_tokens"] == 20 and settings["faster_whisper_max_new_tokens"] == 36
    assert settings["compute_type"] == "float32" and settings["window_samples"] == 480000
    # Fed the clips unpadded, faster-whisper pads features with zeros instead of the log-mel of silence: this
    # random model hears the difference (a trained one barely does), which is why the check pads the audio.
    assert report["faster_whisper_unpadded"]["identical"] < CLIPS


def test_int8_export_is_smaller_and_within_tolerance(float32_export, model_dir, cache_dir, tmp_path, capsys):
    output = tmp_path / "ct2-int8"
    # A random model's int8 transcripts are as random as its float32 ones: a wide tolerance, checked below.
    assert run_export("--model", model_dir, "--quantization", "int8", "--output_dir", output, "--parity_clips",
                      CLIPS, "--wer_tolerance", 1000, f"--data.cache_dir={cache_dir}") == 0
    assert "parity check passed" in capsys.readouterr().out
    float32_size = (float32_export[1] / "model.bin").stat().st_size
    assert (output / "model.bin").stat().st_size < 0.6 * float32_size
    report = read_json(output / "parity.json")
    assert report["quantization"] == "int8" and report["settings"]["compute_type"].startswith("int8")
    assert report["wer_tolerance"] == 1000 and report["failures"] == []
    assert report["wer_difference"] == pytest.approx(report["faster_whisper"]["wer"] - report["transformers"]["wer"])


def test_a_quantized_export_over_the_tolerance_fails(float32_export):
    from loop.ship.parity import parity_failures

    report = read_json(float32_export[1] / "parity.json")
    worse = {**report, "quantization": "int8", "exact": False, "wer_tolerance": 2.0, "wer_difference": 2.5,
             "faster_whisper": {**report["faster_whisper"], "wer": report["transformers"]["wer"] + 2.5}}
    (failure,) = parity_failures(worse)
    assert "int8 ct2 export's WER in faster_whisper" in failure and "2.50 points above" in failure and "tolerance 2" in failure
    assert parity_failures({**worse, "wer_difference": 2.0}) == []


def test_parity_fails_loudly_when_the_export_is_another_model(float32_export, cache_dir, tmp_path):
    """The float32 check compares transcripts: an export of other weights (another seed) does not pass."""
    other = build_multilingual_tiny_whisper(tmp_path / "other", seed=1)
    export = shutil.copytree(float32_export[1], tmp_path / "export")
    config = load_config(None, [f"--data.path={CORPUS}", f"--data.cache_dir={cache_dir}"])
    from loop.ship.export import read_source_model

    source = read_source_model(other)
    clips = read_clips(config, source.processor, source.config.max_target_positions, 2)
    report = run_parity(other, export, "float32", clips, split="test")
    (failure,) = report["failures"]
    assert re.search(r"the float32 ct2 export transcribes [12] of 2 clips differently from the transformers model",
                     failure)
    assert read_json(export / "parity.json")["failures"] == [failure]
    assert read_json(export / "parity.json")["passed"] is False
    assert failure in (export / "FAILED").read_text(encoding="utf-8")


def test_a_broken_export_fails_the_gate_and_is_marked(float32_export, model_dir, cache_dir, tmp_path, capsys):
    """--parity_only re-checks an export in place: one whose weights file was cut short cannot be run, so the gate
    fails with faster-whisper's error, exits 1 and leaves FAILED beside parity.json."""
    export = shutil.copytree(float32_export[1], tmp_path / "export")
    weights = export / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_export("--model", model_dir, "--output_dir", export, "--parity_only", "--parity_clips", 2,
                      f"--data.cache_dir={cache_dir}") == 1
    assert "cannot be run by faster_whisper" in error_line(capsys)
    report = read_json(export / "parity.json")
    assert report["passed"] is False and report["failures"][0].startswith("the float32 ct2 export cannot be run")
    assert "the parity gate failed" in (export / "FAILED").read_text(encoding="utf-8")
    # The intact export passes the same command, and the stale marker goes.
    shutil.copy(float32_export[1] / "model.bin", weights)
    assert run_export("--model", model_dir, "--output_dir", export, "--parity_only", "--parity_clips", 2,
                      f"--data.cache_dir={cache_dir}") == 0
    assert read_json(export / "parity.json")["passed"] and not (export / "FAILED").exists()


def test_a_128_mel_model_exports_with_128_mel_bins(cache_dir, tmp_path):
    from faster_whisper import WhisperModel

    model = build_multilingual_tiny_whisper(tmp_path / "v3-like", num_mel_bins=128)
    output = tmp_path / "ct2"
    assert run_export("--model", model, "--output_dir", output, "--parity_clips", 2,
                      f"--data.cache_dir={cache_dir}") == 0
    assert read_json(output / "preprocessor_config.json")["feature_size"] == 128
    whisper = WhisperModel(str(output), device="cpu", cpu_threads=1)
    assert whisper.model.n_mels == 128 and whisper.feature_extractor.mel_filters.shape[0] == 128
    assert read_json(output / "parity.json")["faster_whisper"]["identical"] == 2


def test_best_folder_converts_by_hand(model_dir, tmp_path):
    """best/ as the loop writes it carries preprocessor_config.json, so CTranslate2's own command line with
    --copy_files gives a folder faster-whisper reads the mel bins from."""
    from accelerate import Accelerator
    from transformers import WhisperForConditionalGeneration

    from loop.model.loading import load_processor
    from loop.run.best_model import write_best_model

    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    best = write_best_model(Accelerator(cpu=True), model, load_processor(str(model_dir)), tmp_path / "run")
    assert read_json(best / "preprocessor_config.json")["feature_size"] == 80
    converter = Path(sys.executable).with_name("ct2-transformers-converter")
    subprocess.run([str(converter), "--model", str(best), "--output_dir", str(tmp_path / "ct2"), "--copy_files",
                    "tokenizer.json", "preprocessor_config.json"], check=True, capture_output=True, env=child_env())
    assert read_json(tmp_path / "ct2" / "preprocessor_config.json")["feature_size"] == 80


def test_the_export_readme_snippet_runs_as_written(float32_export, tmp_path):
    from faster_whisper import WhisperModel

    output = float32_export[1]
    readme = (output / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert f'WhisperModel("{output}")' in snippet and "soxr.resample" in snippet
    clip = corpus_rows("test")[0]["audio_path"]
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("clip.mp3", clip), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(), cwd=tmp_path,
                         check=False)
    assert run.returncode == 0, run.stderr
    whisper = WhisperModel(str(output), device="cpu", cpu_threads=1)
    segments, _ = whisper.transcribe(decode_audio(clip), language="hi", task="transcribe", beam_size=1,
                                       temperature=0.0)
    expected = "".join(segment.text for segment in segments).strip()
    assert expected and run.stdout.rstrip("\n") == expected


# Bad input: each a one-line error naming what is wrong, exit status 2, nothing written.


def error_line(capsys) -> str:
    """The one error line on stderr (progress bars of weight loading may share it)."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return line


@pytest.mark.parametrize("case", ["missing", "empty", "no_weights", "not_whisper"])
def test_a_folder_that_is_not_a_model(case, tmp_path, capsys):
    folder = tmp_path / "folder"
    if case != "missing":
        folder.mkdir()
    if case in ("no_weights", "not_whisper"):
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "whisper" if case == "no_weights" else "bert"}), encoding="utf-8")
    assert run_export("--model", folder, "--output_dir", tmp_path / "out", "--no_parity") == 2
    line = error_line(capsys)
    assert str(folder) in line
    assert {"missing": "no such folder", "empty": "is an empty folder", "no_weights": "no weights",
            "not_whisper": "'bert' model, not a Whisper"}[case] in line
    assert not (tmp_path / "out").exists()


def test_the_tiny_5s_model_is_refused_with_the_reasons(tiny_model_dir, tmp_path, capsys):
    assert run_export("--model", tiny_model_dir, "--output_dir", tmp_path / "out", "--no_parity") == 2
    line = error_line(capsys)
    assert "cannot be exported for faster-whisper" in line and "its window is 5 s" in line
    assert "its decoder has 256 positions" in line and "lacks the empty-string token" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_quantization(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_export("--model", model_dir, "--quantization", "int4", "--output_dir", tmp_path / "out")
    assert stopped.value.code == 2
    assert "--quantization: invalid choice: 'int4'" in capsys.readouterr().err


def test_a_split_with_no_clips_stops_before_the_export(model_dir, corpus_copy, cache_dir, tmp_path, capsys):
    corpus = corpus_copy(train=2, dev=0, test=0)
    assert run_export("--model", model_dir, "--output_dir", tmp_path / "out", f"--data.path={corpus}",
                      f"--data.cache_dir={cache_dir}") == 2
    line = error_line(capsys)
    assert "the parity check has no clips: split 'test'" in line and str(corpus) in line
    assert not (tmp_path / "out").exists()


def test_an_existing_output_dir_needs_overwrite(model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("from before", encoding="utf-8")
    assert run_export("--model", model_dir, "--output_dir", output, "--no_parity") == 2
    assert f"--output_dir {output} already exists; pass --overwrite" in error_line(capsys)
    assert run_export("--model", model_dir, "--output_dir", output, "--no_parity", "--overwrite") == 0
    assert (output / "model.bin").is_file() and not (output / "stale.txt").exists()


def test_an_output_dir_that_holds_the_model(model_dir, capsys):
    assert run_export("--model", model_dir, "--output_dir", model_dir.parent, "--no_parity", "--overwrite") == 2
    assert "holds the model being exported" in error_line(capsys)
    assert (model_dir / "model.safetensors").is_file()


def test_a_full_disk_is_one_line_naming_the_folder(model_dir, tmp_path):
    """A real write failure: the child process may write no file over 2 MB (RLIMIT_FSIZE, with SIGXFSZ ignored
    the write fails with EFBIG), as a full disk fails with ENOSPC: both are the OSError the export reports."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))

    output = tmp_path / "out"
    run = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "export.py"), "--model",
                          str(model_dir), "--output_dir", str(output), "--no_parity"],
                         capture_output=True, text=True, env=child_env(), preexec_fn=limit_file_size, check=False)
    assert run.returncode == 2
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: could not write the export to {output}: File too large (")
    assert "GiB free on its filesystem" in line
    assert not output.exists() and not list(tmp_path.glob(".tmp-*"))


def test_the_model_card_tells_how_to_export(model_dir, tmp_path):
    """A model faster-whisper can run gets the export command and the faster-whisper snippet on its card."""
    from loop.ship.model_card import write_model_card

    best = shutil.copytree(model_dir, tmp_path / "run" / "best")
    config = load_config("quickstart", ["--train.hub_model_id=me/whisper-hi"], str(tmp_path / "run"))
    text = write_model_card(best, {"test_wer": 50.0}, config).read_text(encoding="utf-8")
    section = text.split("## Run it in faster-whisper")[1]
    assert "hf download me/whisper-hi --local-dir whisper-hi" in section
    assert "python scripts/export.py --model whisper-hi --quantization int8 --output_dir whisper-hi-ct2-int8" in section
    assert 'WhisperModel("whisper-hi-ct2-int8")' in section and "soxr.resample" in section
    others = text.split("## Run it in whisper.cpp, onnxruntime or an OpenAI-compatible server")[1]
    assert "python scripts/export.py --model whisper-hi --format ggml --quantization q8_0" in others
    assert "whisper-cli -m whisper-hi-ggml/ggml-model.bin -l hi -nf --no-flash-attn --suppress-nst -f clip.wav" in others
    assert "--format onnx --output_dir whisper-hi-onnx" in others and "python scripts/serve.py --model whisper-hi" in others
