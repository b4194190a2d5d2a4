"""scripts/export.py --format onnx: the tiny 30-s model of tests/export_models.py exported as encoder and decoder
graphs, decoded greedily by our loop over onnxruntime (loop/ship/onnx_decode.py), transcript for transcript equal to
the transformers model through the parity gate; an export of other weights failing it; the README snippet run as
written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export_models import build_multilingual_tiny_whisper, run_export
from tests.helpers import child_env, corpus_rows, docs_snippet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.usefixtures("single_thread")
CLIPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_multilingual_tiny_whisper(tmp_path_factory.mktemp("onnx-model") / "best")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def export(model_dir, cache_dir, tmp_path_factory) -> tuple[int, Path]:
    output = tmp_path_factory.mktemp("onnx") / "onnx"
    rc = run_export("--model", model_dir, "--format", "onnx", "--output_dir", output, "--parity_clips", CLIPS,
                    f"--data.cache_dir={cache_dir}")
    return rc, output


def test_the_graphs_have_the_documented_layout(export, model_dir):
    import onnx

    rc, output = export
    assert rc == 0
    encoder, decoder = onnx.load(str(output / "encoder.onnx")), onnx.load(str(output / "decoder.onnx"))
    assert [i.name for i in encoder.graph.input] == ["input_features"]
    assert [o.name for o in encoder.graph.output] == ["cross_k", "cross_v"]
    assert [i.name for i in decoder.graph.input] == ["input_ids", "self_k", "self_v", "cross_k", "cross_v"]
    assert [o.name for o in decoder.graph.output] == ["logits", "self_k_out", "self_v_out"]
    dims = [d.dim_param or d.dim_value for d in decoder.graph.input[1].type.tensor_type.shape.dim]
    assert dims == [2, "batch", 2, "past", 32]  # layers, batch, heads, past tokens, head_dim
    settings = json.loads((output / "whisper_onnx.json").read_text(encoding="utf-8"))
    assert settings["prompt_tokens"][1:3] != [] and settings["num_mel_bins"] == 80
    # the token embedding is stored once: the output projection uses the same initializer, transposed in the graph
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    shape = sorted([config["vocab_size"], config["d_model"]])
    embedding = [list(t.dims) for t in decoder.graph.initializer if sorted(t.dims) == shape]
    assert len(embedding) == 1, embedding


def test_float32_onnx_reproduces_every_transcript(export):
    report = json.loads((export[1] / "parity.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["exact"] and report["runtime"] == "onnxruntime"
    assert report["onnxruntime"]["identical"] == CLIPS
    assert len({clip["transformers"] for clip in report["clips"]}) == CLIPS  # not identical by accident


def test_int8_onnx_is_smaller_and_held_to_the_tolerance(export, model_dir, cache_dir, tmp_path):
    import onnx

    output = tmp_path / "onnx-int8"
    assert run_export("--model", model_dir, "--format", "onnx", "--quantization", "int8", "--output_dir", output,
                      "--parity_clips", 2, "--wer_tolerance", 1000, f"--data.cache_dir={cache_dir}") == 0
    report = json.loads((output / "parity.json").read_text(encoding="utf-8"))
    assert report["passed"] and not report["exact"] and report["quantization"] == "int8"
    assert all(clip["onnxruntime"] for clip in report["clips"])
    assert json.loads((output / "export.json").read_text(encoding="utf-8"))["quantization"] == "int8"
    for name in ("encoder.onnx", "decoder.onnx"):
        ops = [node.op_type for node in onnx.load(str(output / name)).graph.node]
        # The weight products are int8; the attention products of two activations stay float MatMuls.
        assert "MatMulInteger" in ops and "MatMul" in ops
    # The encoder shrinks; this tiny decoder is mostly its float32 embedding, now beside an int8 output projection.
    assert (output / "encoder.onnx").stat().st_size < (export[1] / "encoder.onnx").stat().st_size
    assert not list(output.glob("*.float32"))  # the float32 graphs quantized from are gone


def test_an_export_of_other_weights_fails_the_gate(export, model_dir, cache_dir, tmp_path, capsys):
    other = build_multilingual_tiny_whisper(tmp_path / "other", seed=1)
    assert run_export("--model", other, "--format", "onnx", "--output_dir", tmp_path / "other-onnx",
                      "--no_parity") == 0
    broken = shutil.copytree(export[1], tmp_path / "broken")
    shutil.copy(tmp_path / "other-onnx" / "decoder.onnx", broken / "decoder.onnx")  # the other model's decoder
    assert run_export("--model", model_dir, "--format", "onnx", "--output_dir", broken, "--parity_only",
                      "--parity_clips", 2, f"--data.cache_dir={cache_dir}") == 1
    assert "differently from the transformers model in onnxruntime" in capsys.readouterr().err
    assert (broken / "FAILED").is_file()
    assert json.loads((broken / "parity.json").read_text(encoding="utf-8"))["passed"] is False


def test_the_readme_snippet_runs_as_written(export, tmp_path):
    from loop.data.audio import decode_audio
    from loop.ship.onnx_decode import OnnxWhisper

    output = export[1]
    snippet = re.search(r"```python\n(.*?)```", (output / "README.md").read_text(encoding="utf-8"), re.DOTALL).group(1)
    clip = corpus_rows("test")[0]["audio_path"]
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("clip.wav", clip), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(),
                         cwd=Path(__file__).parent.parent, check=False)
    assert run.returncode == 0, run.stderr
    expected = OnnxWhisper(output).transcribe([decode_audio(clip)])[0]
    assert expected and run.stdout.rstrip("\n") == expected


def test_the_docs_snippet_runs_as_written(export, tmp_path):
    from loop.data.audio import decode_audio
    from loop.ship.onnx_decode import OnnxWhisper

    clip = corpus_rows("test")[1]["audio_path"]
    snippet = docs_snippet("export-formats.md", "OnnxWhisper(", {"exports/onnx": str(export[1]), "clip.wav": clip})
    script = tmp_path / "docs_snippet.py"
    script.write_text(snippet, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(),
                         cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == OnnxWhisper(export[1]).transcribe([decode_audio(clip)])[0]
