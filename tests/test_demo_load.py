"""The demo under load and against uploads that lie, served in-process on loopback and called with real clients:
16 concurrent transcriptions are all answered with the right transcript, wait in Gradio's queue and run one at a
time, and leave resident memory bounded; a WAV whose header claims hours, a 500 MB file (sparse: it takes no
disk), a file that is not audio and an empty recording each get a clear answer, and the app keeps serving."""

from __future__ import annotations

import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import soundfile

from loop.data.audio import SAMPLE_RATE, decode_audio

pytestmark = pytest.mark.usefixtures("single_thread")
CONCURRENT = 16
MAX_FILE_SIZE = 5 * 1024 * 1024  # bytes, the served app's upload limit
RSS_GROWTH_MB = 150  # resident memory the 16 requests may add (measured: docs/evaluate-and-ship.md, "Demo")


def rss_mb() -> float:
    """This process's resident memory now (the server runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def wav_header(data_bytes: int, rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono PCM WAV header whose `data` chunk claims `data_bytes` bytes."""
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", data_bytes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def clips(corpus_dir):
    return sorted((corpus_dir / "clips").glob("*.mp3"))[:CONCURRENT]


@pytest.fixture(scope="module")
def served(decoding_checkpoint):
    """(transcriber, app) served on a free local port; closed after the module."""
    from loop.ship.demo import Transcriber, launch, make_blocks

    transcriber = Transcriber(decoding_checkpoint, max_duration_s=20.0)
    app = make_blocks(transcriber, max_queue=32)
    launch(app, host="127.0.0.1", port=free_port(), max_file_size=MAX_FILE_SIZE, block=False)
    try:
        yield transcriber, app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1].local_url, verbose=False)


def transcribe(client, path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), "hi", "transcribe", api_name="/transcribe")[0]


def test_concurrent_requests_queue_run_one_at_a_time_and_get_their_own_transcripts(served, client, clips):
    from gradio_client import Client, handle_file

    transcriber, app = served
    expected = {clip: transcriber.transcribe_file(clip, "hi", "transcribe")[0] for clip in clips}
    assert len(set(expected.values())) > CONCURRENT // 2  # distinct answers: a mix-up would show
    transcribe(client, clips[0])  # warm-up: the first request loads Gradio's upload and queue machinery
    before = rss_mb()
    # 16 clients, each with its own connection and session, all submitting at once.
    clients = [Client(app.local_url, verbose=False) for _ in range(CONCURRENT)]
    jobs = [c.submit(handle_file(str(clip)), "hi", "transcribe", api_name="/transcribe")
            for c, clip in zip(clients, clips)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda job: job.result(timeout=600), jobs))
    after = rss_mb()
    assert [text for text, _ in answers] == [expected[clip] for clip in clips]
    assert all(seconds > 0 for _, seconds in answers)
    assert transcriber.most_in_flight == 1 and transcriber.in_flight == 0  # queued, never two in the handler
    print(f"\nRSS {before:.0f} MB before {CONCURRENT} concurrent requests, {after:.0f} MB after")
    assert after - before < RSS_GROWTH_MB


def test_uploads_that_lie_get_a_clear_answer_and_the_app_keeps_serving(served, client, clips, tmp_path):
    import httpx
    from gradio_client.exceptions import AppError

    from loop.ship.demo import DemoInputError
    from loop.ship.demo_sources import wav_header_note

    transcriber, app = served
    good = transcriber.transcribe_file(clips[1], "hi", "transcribe")[0]

    # A header that claims 3 hours in front of 2 s of speech: the 2 s are transcribed, as from an honest file.
    speech = decode_audio(clips[1])
    honest, liar = tmp_path / "honest.wav", tmp_path / "liar.wav"
    soundfile.write(honest, speech, SAMPLE_RATE, subtype="PCM_16")
    samples = soundfile.read(honest, dtype="int16")[0].astype("<i2").tobytes()
    liar.write_bytes(wav_header(3 * 3600 * SAMPLE_RATE * 2) + samples)
    assert wav_header_note(liar) == (f"liar.wav: its header claims 3.0 h of audio, but the file holds "
                                     f"{len(samples) / 2 / SAMPLE_RATE:.1f} s; transcribing the "
                                     f"{len(samples) / 2 / SAMPLE_RATE:.1f} s it holds.")
    assert wav_header_note(honest) is None and wav_header_note(clips[0]) is None
    assert transcribe(client, liar) == transcribe(client, honest)

    # 500 MB (a valid WAV header, then a hole: no disk is used), streamed to the server's upload route as a
    # browser would send it: refused with 413 and the limit.
    big = tmp_path / "big.wav"
    with open(big, "wb") as handle:
        handle.write(wav_header(500 * 1024 * 1024 - 44))
        handle.truncate(500 * 1024 * 1024)
    assert big.stat().st_blocks * 512 < 1024 * 1024
    with open(big, "rb") as handle:
        response = httpx.post(f"{app.local_url}gradio_api/upload", files={"files": ("big.wav", handle, "audio/wav")},
                              timeout=300)
    assert response.status_code == 413 and f"maximum allowed size of {MAX_FILE_SIZE} bytes" in response.text
    # With a higher upload limit the same file reaches the demo, which reads its duration from the header and
    # refuses it without decoding 4.5 hours of samples.
    before = rss_mb()
    with pytest.raises(DemoInputError, match=r"The audio is 16384 s long; this demo transcribes at most 20 s"):
        transcriber.load_audio(big)
    assert rss_mb() - before < 50

    not_audio = tmp_path / "photo.wav"
    not_audio.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    with pytest.raises(AppError, match=r"photo.wav cannot be read as audio \(unreadable_audio\): upload a WAV"):
        transcribe(client, not_audio)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(wav_header(0))
    with pytest.raises(AppError, match="empty.wav is an empty recording \\(no samples\\): record again"):
        transcribe(client, empty)
    silence = tmp_path / "zero-bytes.wav"
    silence.write_bytes(b"")
    with pytest.raises(AppError, match="zero-bytes.wav is an empty recording"):
        transcribe(client, silence)

    assert transcribe(client, clips[1]) == good  # still serving, and still right
