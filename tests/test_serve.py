"""scripts/serve.py's app answered by the official `openai` client on 127.0.0.1: every response format, the same
transcripts as the project's decoding (loop.model.decoding.transcribe, what scripts/evaluate.py runs), long audio
through the long-form path, bad uploads refused with OpenAI's error body and the right status, a bearer token, and
16 concurrent requests each getting its own transcript."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile

from loop.data.audio import SAMPLE_RATE, as_cached, decode_audio

pytestmark = pytest.mark.usefixtures("single_thread")
CONCURRENT = 16
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A uvicorn server for `app` in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):  # bounded: 20 s at most
            if self.server.started:
                break
            time.sleep(0.1)
        assert self.server.started, "uvicorn did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def backend(decoding_checkpoint):
    from loop.ship.serve_backends import load_backend

    return load_backend(decoding_checkpoint)


@pytest.fixture(scope="module")
def server(backend):
    from loop.ship.serve import build_app

    served = Served(build_app(backend, "tiny", max_file_bytes=2 * 2**20, max_duration_s=20.0, max_queue=32,
                              api_key=KEY))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def clips(corpus_dir):
    return sorted((corpus_dir / "clips").glob("*.mp3"))[:CONCURRENT]


def evaluate_transcript(backend, path) -> str:
    """The transcript of the project's decoding, as scripts/evaluate.py computes it from the cached samples."""
    from loop.model.decoding import transcribe
    from loop.model.features import pad_waveforms

    audio, _ = pad_waveforms([as_cached(decode_audio(path))])
    return transcribe(backend.model, backend.log_mel(audio), backend.processor.tokenizer)[0]


def test_every_response_format_through_the_openai_client(client, backend, clips):
    clip = clips[0]
    expected = evaluate_transcript(backend, clip)
    assert expected
    with open(clip, "rb") as audio:
        assert client.audio.transcriptions.create(model="tiny", file=audio).text == expected
    with open(clip, "rb") as audio:
        assert client.audio.transcriptions.create(model="tiny", file=audio, response_format="text",
                                                  language="hi").strip() == expected
    with open(clip, "rb") as audio:
        verbose = client.audio.transcriptions.create(model="tiny", file=audio, response_format="verbose_json")
    duration = len(decode_audio(clip)) / SAMPLE_RATE
    assert verbose.text == expected and verbose.language == "hi" and verbose.duration == pytest.approx(duration, 1e-3)
    assert verbose.segments and all(0 <= s.start <= s.end <= duration + 1e-6 for s in verbose.segments)
    with open(clip, "rb") as audio:
        srt = client.audio.transcriptions.create(model="tiny", file=audio, response_format="srt")
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == len(verbose.segments)
    assert re.fullmatch(r"1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n.*", blocks[0], re.DOTALL)
    with open(clip, "rb") as audio:
        vtt = client.audio.transcriptions.create(model="tiny", file=audio, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    assert len(re.findall(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", vtt)) == len(verbose.segments)


def test_temperature_and_prompt_are_accepted(client, clips):
    with open(clips[1], "rb") as audio:
        sampled = client.audio.transcriptions.create(model="tiny", file=audio, temperature=0.8, prompt="नमस्ते")
    assert isinstance(sampled.text, str)


def test_long_audio_goes_through_the_long_form_path(client, backend, clips, tmp_path):
    from loop.eval.long_form import transcribe_long
    from loop.model.features import pad_waveforms

    waveform = np.concatenate([decode_audio(clip) for clip in clips[:4]])
    assert len(waveform) / SAMPLE_RATE > backend.window_s  # the tiny model's window is 5 s
    path = tmp_path / "long.wav"
    soundfile.write(path, waveform, SAMPLE_RATE, subtype="FLOAT")
    audio, _ = pad_waveforms([as_cached(decode_audio(path))])
    expected = transcribe_long(backend.model, backend.log_mel, backend.processor.tokenizer, audio)
    with open(path, "rb") as handle:
        assert client.audio.transcriptions.create(model="tiny", file=handle).text == expected


def test_sixteen_concurrent_requests_get_their_own_transcripts(client, backend, clips):
    expected = [evaluate_transcript(backend, clip) for clip in clips]
    assert len(set(expected)) > CONCURRENT // 2  # different clips, mostly different texts

    def ask(clip):
        with open(clip, "rb") as audio:
            return client.audio.transcriptions.create(model="tiny", file=audio).text

    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(ask, clips))
    assert answers == expected


def test_bad_uploads_get_their_status_and_an_openai_error_body(server, clips, tmp_path):
    import httpx
    import openai
    from openai import OpenAI

    headers = {"Authorization": f"Bearer {KEY}"}

    def post(name: str, data: bytes, **fields):
        return httpx.post(f"{server.url}/v1/audio/transcriptions", headers=headers, timeout=120,
                          files={"file": (name, data)}, data={"model": "tiny", **fields})

    cases = {
        "empty file": (post("empty.wav", b""), 400, "empty_file"),
        "not audio": (post("photo.wav", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40), 415, "not_audio"),
        "too large": (post("big.wav", b"\0" * (2 * 2**20 + 1)), 413, "file_too_large"),
        "bad format": (post("a.mp3", clips[0].read_bytes(), response_format="xml"), 400, "invalid_value"),
        "bad language": (post("a.mp3", clips[0].read_bytes(), language="klingon"), 400, "invalid_language"),
    }
    silence = tmp_path / "empty.wav"
    soundfile.write(silence, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    cases["no samples"] = (post("empty.wav", silence.read_bytes()), 400, "empty_audio")
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(25 * SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
    cases["too long"] = (post("long.wav", long.read_bytes()), 413, "audio_too_long")
    for name, (response, status, code) in cases.items():
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"], name
    assert "this server transcribes at most 20 s" in cases["too long"][0].json()["error"]["message"]
    missing = httpx.post(f"{server.url}/v1/audio/transcriptions", headers=headers, data={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    # Without the key, or with another: 401, which the openai client raises as AuthenticationError.
    wrong = OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with open(clips[0], "rb") as audio, pytest.raises(openai.AuthenticationError):
        wrong.audio.transcriptions.create(model="tiny", file=audio)
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queue"] == 0


def test_a_full_queue_is_answered_503(backend, clips):
    """With room for no waiting request, one request holds the model (its lock taken here) and the next is
    refused at once."""
    import httpx

    from loop.ship.serve import build_app

    served = Served(build_app(backend, "tiny", max_queue=0))
    try:
        with ThreadPoolExecutor(1) as pool:
            with backend.lock:
                first = pool.submit(httpx.post, f"{served.url}/v1/audio/transcriptions", timeout=120,
                                    files={"file": ("a.mp3", clips[0].read_bytes())})
                for _ in range(100):  # bounded: until the first request is admitted
                    if httpx.get(f"{served.url}/health").json()["queue"] == 1:
                        break
                    time.sleep(0.1)
                second = httpx.post(f"{served.url}/v1/audio/transcriptions", timeout=120,
                                    files={"file": ("a.mp3", clips[0].read_bytes())})
                assert second.status_code == 503 and second.json()["error"]["code"] == "server_busy"
            assert first.result().status_code == 200  # the lock released, it runs
    finally:
        served.close()


def test_the_docs_client_snippet_runs_as_written(server, backend, clips, tmp_path):
    import subprocess
    import sys

    from tests.helpers import child_env, docs_snippet

    snippet = docs_snippet("export-formats.md", "client.audio.transcriptions.create",
                           {"http://127.0.0.1:8000/v1": f"{server.url}/v1", '"unused"': f'"{KEY}"',
                            "clip.wav": str(clips[2])})
    script = tmp_path / "client.py"
    script.write_text(snippet, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(),
                         cwd=tmp_path, check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == evaluate_transcript(backend, clips[2])


def test_a_ctranslate2_export_is_served_through_faster_whisper(clips, tmp_path):
    """--model may be a CTranslate2 export: faster-whisper decodes it, with timed segments."""
    from openai import OpenAI

    from loop.ship.export import export_ct2, read_source_model
    from loop.ship.serve import build_app
    from loop.ship.serve_backends import FasterWhisperBackend, load_backend
    from tests.export_models import build_multilingual_tiny_whisper

    model = build_multilingual_tiny_whisper(tmp_path / "model")
    export = export_ct2(read_source_model(model), tmp_path / "ct2", "float32")
    backend = load_backend(export)
    assert isinstance(backend, FasterWhisperBackend)
    expected = backend.transcribe(decode_audio(clips[0])).text
    served = Served(build_app(backend, "ct2"))
    try:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=300)
        with open(clips[0], "rb") as audio:
            assert client.audio.transcriptions.create(model="ct2", file=audio).text == expected != ""
        with open(clips[0], "rb") as audio:
            verbose = client.audio.transcriptions.create(model="ct2", file=audio, response_format="verbose_json")
        assert verbose.language == "hi" and verbose.segments
        assert all(0 <= s.start <= s.end <= verbose.duration for s in verbose.segments)
    finally:
        served.close()


def test_an_assistant_model_gives_the_same_transcripts(backend, clips, tmp_path):
    """--assistant_model: greedy requests are decoded by speculative decoding with a student as assistant (its
    decoder runs) and get the plain server's transcripts; a CTranslate2 export with an assistant is refused."""
    from openai import OpenAI

    from loop.model.student import make_student
    from loop.ship.serve import build_app
    from loop.ship.serve_backends import load_backend

    student = make_student(str(backend.model.name_or_path), tmp_path / "student", 1)[0]
    assisted = load_backend(backend.model.name_or_path, student)
    drafts = []
    assisted.assistant.get_decoder().register_forward_hook(lambda *_: drafts.append(1))
    served = Served(build_app(assisted, "tiny"))
    try:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=300)
        for clip in clips[:2]:
            with open(clip, "rb") as audio:
                assert client.audio.transcriptions.create(model="tiny", file=audio).text == \
                       backend.transcribe(decode_audio(clip)).text
    finally:
        served.close()
    assert drafts
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="--assistant_model works with a model folder"):
        load_backend(tmp_path / "ct2", student)
