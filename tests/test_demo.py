"""The Gradio demo, served in-process and called with gradio_client: the transcript of a shipped clip equals
`transcribe()`'s, bad input gives a clear message, audio longer than the window goes through long-form with a
progress bar, the page offers shipped clips and names the model by its card. Load and lying uploads:
tests/test_demo_load.py."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile

from loop.data.audio import SAMPLE_RATE, as_cached, decode_audio

pytestmark = pytest.mark.usefixtures("single_thread")
MAX_DURATION_S = 20.0  # the checkpoint's window is 5 s: a 12-s clip is long-form, a 25-s clip is over the limit


@pytest.fixture(scope="module")
def clips(corpus_dir):
    return sorted((corpus_dir / "clips").glob("*.mp3"))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory, clips) -> str:
    """About 12 s of speech: shipped clips one after another, as a WAV."""
    waveform, chosen = [], iter(clips)
    while sum(len(w) for w in waveform) < 12 * SAMPLE_RATE:
        waveform.append(decode_audio(next(chosen)))
    path = tmp_path_factory.mktemp("long") / "long.wav"
    soundfile.write(path, np.concatenate(waveform), SAMPLE_RATE)
    return str(path)


@pytest.fixture(scope="module")
def too_long_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("too-long") / "too-long.wav"
    soundfile.write(path, np.zeros(int(25 * SAMPLE_RATE), dtype=np.float32), SAMPLE_RATE)
    return str(path)


@pytest.fixture(scope="module")
def not_audio(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("not-audio") / "notes.wav"
    path.write_text("यह आवाज़ नहीं, पाठ है।\n" * 50, encoding="utf-8")
    return str(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client(decoding_checkpoint):
    """The app served on a free local port, and a gradio_client connected to it; closed after the module."""
    from gradio_client import Client

    from loop.ship.demo import build_app, launch

    app = build_app(decoding_checkpoint, max_duration_s=MAX_DURATION_S)
    launch(app, host="127.0.0.1", port=free_port(), max_file_size="5mb", block=False)
    try:
        yield Client(app.local_url, verbose=False)
    finally:
        app.close()


def test_transcript_equals_transcribe(client, decoding_checkpoint, clips):
    from gradio_client import handle_file

    from loop.model.decoding import transcribe
    from loop.model.loading import load_for_inference

    model, processor = load_for_inference(str(decoding_checkpoint))
    features = processor.feature_extractor(as_cached(decode_audio(clips[0])), sampling_rate=SAMPLE_RATE,
                                           return_tensors="pt").input_features  # the extractor's own features
    expected = transcribe(model, features, processor.tokenizer)[0]
    text, seconds = client.predict(handle_file(str(clips[0])), "hi", "transcribe", api_name="/transcribe")
    assert text == expected and text
    assert 0 < seconds < 60


def test_bad_input_gets_a_clear_message(client, not_audio, too_long_clip):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="No audio: record something with the microphone or upload a file first"):
        client.predict(None, "hi", "transcribe", api_name="/transcribe")
    with pytest.raises(AppError, match=r"notes.wav cannot be read as audio \(unreadable_audio\): upload a WAV, MP3"):
        client.predict(handle_file(not_audio), "hi", "transcribe", api_name="/transcribe")
    with pytest.raises(AppError, match=r"The audio is 25 s long; this demo transcribes at most 20 s"):
        client.predict(handle_file(too_long_clip), "hi", "transcribe", api_name="/transcribe")


def test_long_audio_goes_through_long_form(client, decoding_checkpoint, long_clip):
    """The 12-s clip is decoded window by window: the encoder sees one 5-s window at a time, at least three of
    them (a forward pre-hook records what it is given), and the transcript is transcribe_long's."""
    from gradio_client import handle_file

    from loop.model.features import pad_waveforms
    from loop.ship.demo import Transcriber, transcribe_long

    text, _ = client.predict(handle_file(long_clip), "hi", "transcribe", api_name="/transcribe")
    assert isinstance(text, str)
    transcriber = Transcriber(decoding_checkpoint, max_duration_s=MAX_DURATION_S)
    window_frames = transcriber.processor.feature_extractor.nb_max_frames  # 500 frames in a 5-s window
    encoded = []

    def record(encoder, args, kwargs):
        encoded.append((args[0] if args else kwargs["input_features"]).shape)

    transcriber.model.get_encoder().register_forward_pre_hook(record, with_kwargs=True)
    direct, seconds = transcriber.transcribe_file(long_clip, "hindi", "transcribe")
    assert direct == text and seconds > 0
    assert len(encoded) >= math.ceil(len(decode_audio(long_clip)) / SAMPLE_RATE / transcriber.window_s) >= 3
    assert all(shape[0] == 1 and shape[-1] == window_frames for shape in encoded)
    audio, _ = pad_waveforms([as_cached(decode_audio(long_clip))])
    assert direct == transcribe_long(transcriber.model, transcriber.log_mel, transcriber.processor.tokenizer, audio)


def test_transcribe_file_language_and_task_are_per_call(decoding_checkpoint, clips):
    from loop.ship.demo import DemoInputError, Transcriber

    transcriber = Transcriber(decoding_checkpoint)
    assert (transcriber.language, transcriber.task, transcriber.window_s) == ("hi", "transcribe", 5.0)
    transcriber.transcribe_file(clips[1], "english", "translate")
    assert (transcriber.language, transcriber.task) == ("hi", "transcribe")  # the saved settings are restored
    with pytest.raises(DemoInputError, match="No audio"):
        transcriber.transcribe_file("", None, None)


def test_long_form_reports_progress(decoding_checkpoint, long_clip):
    """gr.Progress gets the share of the recording decoded before each window: from 0, rising, below 1."""
    from loop.ship.demo import Transcriber

    transcriber = Transcriber(decoding_checkpoint, max_duration_s=MAX_DURATION_S)
    shares = []
    transcriber.transcribe_file(long_clip, progress=shares.append)
    assert len(shares) >= 3 and shares[0] == 0 and shares == sorted(shares) and shares[-1] < 1
    transcriber.transcribe_file(str(long_clip), progress=None)  # no progress bar: nothing to call


def test_the_model_is_named_by_its_card(tmp_path, decoding_checkpoint):
    from loop.config import RunConfig
    from loop.ship.demo_sources import card_name
    from loop.ship.model_card import render_model_card

    best = tmp_path / "runs" / "my-run" / "best"
    best.mkdir(parents=True)
    assert card_name(best) == "my-run"  # no card: the run's folder
    config = RunConfig(output_dir=str(tmp_path / "runs" / "my-run"))
    (best / "README.md").write_text(render_model_card({}, config), encoding="utf-8")
    assert card_name(best) == "my-run"  # the card's model-index name
    config.output_dir = str(tmp_path / "elsewhere")
    config.train.hub_model_id = "someone/whisper-small-hi"
    (best / "README.md").write_text(render_model_card({}, config), encoding="utf-8")
    assert card_name(best) == "someone/whisper-small-hi"  # the repository the card's snippet loads
    assert card_name("openai/whisper-small") == "openai/whisper-small"
    assert card_name(decoding_checkpoint) == decoding_checkpoint.name


def test_the_page_offers_shipped_clips_names_the_model_and_says_how_it_decodes(decoding_checkpoint, corpus_dir):
    from loop.ship.demo import LONG_FORM, build_app
    from loop.ship.demo_sources import example_clips
    from tests.helpers import corpus_rows

    clips = example_clips()
    test_rows = corpus_rows("test")[:5]
    assert clips == [(row["audio_path"], row["text"]) for row in test_rows]
    assert all(str(corpus_dir) in path for path, _ in clips)  # files in the repository, not generated ones
    assert example_clips(corpus_dir / "no-such-folder") == []
    app = build_app(decoding_checkpoint, examples="")
    assert app.title == f"whisper-loop: {decoding_checkpoint.name}"
    (dataset,) = [c for c in app.config["components"] if c["type"] == "dataset"]
    assert [sample[0] for sample in dataset["props"]["samples"]] == [Path(p).name for p, _ in clips]
    assert dataset["props"]["sample_labels"] == [text for _, text in clips]
    markdown = next(c for c in app.config["components"] if c["type"] == "markdown")["props"]["value"]
    assert LONG_FORM in markdown and "sequential long-form decoding" in markdown
    assert not [c for c in build_app(decoding_checkpoint, examples=None).config["components"]
                if c["type"] == "dataset"]
