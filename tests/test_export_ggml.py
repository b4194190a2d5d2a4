"""scripts/export.py --format ggml: the tiny 30-s model of tests/export_models.py (special tokens at Whisper's ids)
written as whisper.cpp's GGML file, read back by an independent parser of the layout, transcribed by whisper.cpp
(pywhispercpp) through the parity gate; the quantized blocks decoded back; a broken file failing the gate."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.export_models import build_multilingual_tiny_whisper, run_export
from tests.helpers import child_env, corpus_rows, docs_snippet

pytest.importorskip("pywhispercpp")
pytestmark = pytest.mark.usefixtures("single_thread")
CLIPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_multilingual_tiny_whisper(tmp_path_factory.mktemp("ggml-model") / "best", whisper_ids=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ggml-cache")


@pytest.fixture(scope="module")
def float16_export(model_dir, cache_dir, tmp_path_factory) -> tuple[int, Path]:
    output = tmp_path_factory.mktemp("ggml") / "ggml-f16"
    # A random model's WER (about 100) swings by tens of points with one token changed, so the tolerance here is
    # wide; the layout is checked by the transcripts' first characters and their CER against the model's below.
    rc = run_export("--model", model_dir, "--format", "ggml", "--output_dir", output, "--parity_clips", CLIPS,
                    "--wer_tolerance", 1000, f"--data.cache_dir={cache_dir}")
    return rc, output


def read_ggml(path: Path) -> dict:
    """The file parsed by the layout alone: hyperparameters, mel filters, token count, tensors' (type, dims)."""
    data = path.read_bytes()
    magic, *hyper = struct.unpack_from("<12i", data, 0)
    offset = 48
    n_mels, n_fft = struct.unpack_from("<2i", data, offset)
    offset += 8 + 4 * n_mels * n_fft
    (n_tokens,) = struct.unpack_from("<i", data, offset)
    offset += 4
    tokens = []
    for _ in range(n_tokens):
        (length,) = struct.unpack_from("<i", data, offset)
        tokens.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    sizes = {0: (4, 1), 1: (2, 1), 8: (34, 32), 2: (18, 32), 6: (22, 32)}  # bytes per block, values per block
    tensors = {}
    while offset < len(data):
        dims, name_length, kind = struct.unpack_from("<3i", data, offset)
        shape = struct.unpack_from(f"<{dims}i", data, offset + 12)
        offset += 12 + 4 * dims
        name = data[offset:offset + name_length].decode()
        offset += name_length
        per_block, values = sizes[kind]
        offset += int(np.prod(shape)) // values * per_block
        tensors[name] = (kind, shape)
    assert offset == len(data)
    return {"magic": magic, "hyper": hyper, "mels": (n_mels, n_fft), "tokens": tokens, "tensors": tensors}


def test_the_file_has_whisper_cpp_layout_and_passes_the_gate(float16_export):
    rc, output = float16_export
    assert rc == 0
    parsed = read_ggml(output / "ggml-model.bin")
    assert parsed["magic"] == 0x67676D6C
    assert parsed["hyper"] == [51865, 1500, 64, 2, 2, 448, 64, 2, 2, 80, 1]
    assert parsed["mels"] == (80, 201) and len(parsed["tokens"]) == 50257 and parsed["tokens"][50256] == b""
    tensors = parsed["tensors"]
    assert tensors["encoder.conv1.weight"] == (1, (3, 80, 64)) and tensors["encoder.conv1.bias"] == (0, (1, 64))
    assert tensors["decoder.token_embedding.weight"] == (1, (64, 51865))
    assert tensors["decoder.blocks.1.cross_attn.key.weight"][0] == 1 and "decoder.blocks.1.cross_attn.key.bias" not in tensors
    assert tensors["encoder.positional_embedding"] == (0, (64, 1500))
    report = json.loads((output / "parity.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["runtime"] == "whisper_cpp" and not report["exact"]
    assert "whisper.cpp computes its own log-mel" in report["front_end"]
    texts = [clip["whisper_cpp"] for clip in report["clips"]]
    assert all(texts) and len(set(texts)) == CLIPS  # whisper.cpp decoded every clip, each to its own text
    # This random model is made to be sensitive (every clip its own text), so float16 rounding and whisper.cpp's
    # own features move some argmax decisions; still, on at least half the clips it starts as transformers does
    # (the same first characters), which weights read in the wrong layout or another vocabulary would not give.
    same_start = sum(c["whisper_cpp"][:4] == c["transformers"][:4] for c in report["clips"])
    assert same_start >= CLIPS // 2
    assert report["whisper_cpp"]["agreement_cer"] < 100
    # The model's suppressed tokens reach whisper.cpp as suppress_nst (off by default there); this tiny model
    # suppresses its unused filler tokens too, which whisper.cpp cannot, and parity.json says so.
    settings = report["settings"]
    assert settings["whisper_cpp_suppress_nst"] is True and settings["whisper_cpp_unsuppressed_count"] > 0
    # whisper.cpp keeps the token it counts before checking max_tokens: the cap less one gives the cap.
    assert settings["whisper_cpp_max_tokens"] == settings["max_new_tokens"] - 1
    assert settings["whisper_cpp_flash_attn"] is False  # its float16 accumulation moves greedy choices


def test_non_speech_ids_are_whisper_cpps():
    """whisper.cpp's suppress_nst list, looked up as whole tokens alone and after a space, with " -" and " '"."""
    from loop.ship.whisper_cpp import non_speech_ids

    vocab = [b"a", b"(", b" (", b" -", b"-", b"\xe2\x99", "♪".encode(), b" '", b"((", b"ab"]
    assert non_speech_ids(vocab) == {1, 2, 3, 6, 7, 8}  # not "-" alone, nor the first bytes of "♪"


def dequantize(block: bytes, kind: str) -> np.ndarray:
    scale = np.frombuffer(block[:2], dtype=np.float16).astype(np.float32)[0]
    if kind == "q8_0":
        return scale * np.frombuffer(block[2:], dtype=np.int8).astype(np.float32)
    if kind == "q4_0":
        packed = np.frombuffer(block[2:], dtype=np.uint8)
        return scale * (np.concatenate([packed & 0x0F, packed >> 4]).astype(np.float32) - 8)
    high = int.from_bytes(block[2:6], "little")
    packed = np.frombuffer(block[6:], dtype=np.uint8)
    low = np.concatenate([packed & 0x0F, packed >> 4]).astype(np.int32)
    fifth = np.array([(high >> j) & 1 for j in range(32)]) << 4
    return scale * ((low | fifth).astype(np.float32) - 16)


@pytest.mark.parametrize(("kind", "size", "bits"), [("q8_0", 34, 8), ("q5_0", 22, 5), ("q4_0", 18, 4)])
def test_quantized_blocks_decode_back_within_a_step(kind, size, bits):
    from loop.ship.ggml import quantize

    values = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    encoded = quantize(values, kind)
    assert len(encoded) == 8 * size
    decoded = np.concatenate([dequantize(encoded[i:i + size], kind) for i in range(0, len(encoded), size)])
    step = np.abs(values.reshape(-1, 32)).max(axis=1).repeat(32) / (2 ** (bits - 1) - 1)
    assert np.all(np.abs(decoded - values.ravel()) <= step * 0.51 + 1e-3)


def test_q8_0_is_smaller_and_runs(float16_export, model_dir, cache_dir, tmp_path):
    output = tmp_path / "ggml-q8"
    assert run_export("--model", model_dir, "--format", "ggml", "--quantization", "q8_0", "--output_dir", output,
                      "--parity_clips", 2, "--wer_tolerance", 1000, f"--data.cache_dir={cache_dir}") == 0
    assert read_ggml(output / "ggml-model.bin")["hyper"][-1] == 2007  # q8_0 (7) + 1000 * quantization version 2
    assert (output / "ggml-model.bin").stat().st_size < 0.75 * (float16_export[1] / "ggml-model.bin").stat().st_size
    report = json.loads((output / "parity.json").read_text(encoding="utf-8"))
    assert report["passed"] and all(clip["whisper_cpp"] for clip in report["clips"])


def test_a_broken_file_fails_the_gate(float16_export, model_dir, cache_dir, tmp_path):
    export = shutil.copytree(float16_export[1], tmp_path / "export")
    weights = export / "ggml-model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_export("--model", model_dir, "--format", "ggml", "--output_dir", export, "--parity_only",
                      "--parity_clips", 2, f"--data.cache_dir={cache_dir}") == 1
    report = json.loads((export / "parity.json").read_text(encoding="utf-8"))
    assert not report["passed"] and report["failures"][0].startswith("the float16 ggml export cannot be run by "
                                                                     "whisper_cpp: RuntimeError: whisper.cpp ")
    assert (export / "FAILED").is_file()


def test_a_model_with_other_special_ids_is_refused(cache_dir, tmp_path, capsys):
    model = build_multilingual_tiny_whisper(tmp_path / "other-ids")
    assert run_export("--model", model, "--format", "ggml", "--output_dir", tmp_path / "out", "--no_parity") == 2
    assert "whisper.cpp assumes 50257" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_docs_snippet_runs_as_written(float16_export, tmp_path):
    """docs/export-formats.md's pywhispercpp lines, on a 16-kHz WAV of a shipped clip, print whisper.cpp's text."""
    import soundfile

    from loop.data.audio import SAMPLE_RATE, decode_audio

    wav = tmp_path / "clip.wav"
    soundfile.write(wav, decode_audio(corpus_rows("test")[0]["audio_path"]), SAMPLE_RATE, subtype="PCM_16")
    snippet = docs_snippet("export-formats.md", "pywhispercpp.model",
                           {"exports/ggml/ggml-model.bin": str(float16_export[1] / "ggml-model.bin"),
                            "clip.wav": str(wav)})
    script = tmp_path / "docs_snippet.py"
    script.write_text(snippet, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(),
                         cwd=tmp_path, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip()  # whisper.cpp's transcript of the clip
