"""A Gradio demo of a saved model: record or upload audio, get the transcript and the decode time.

Clips within the model's audio window decode through `loop.evaluation.transcribe`, exactly as the training loop
and `scripts/evaluate.py` decode; longer ones (up to `max_duration_s`) through Whisper's long-form generation,
which slides the window along the audio using the timestamps the model predicts. Audio is read with
`loop.audio.decode_audio` (soundfile + soxr, no FFmpeg).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.models.whisper.tokenization_whisper import LANGUAGES  # noqa: E402

from loop.audio import SAMPLE_RATE, AudioError, as_cached, decode_audio  # noqa: E402
from loop.encoder_window import batch_features  # noqa: E402
from loop.evaluation import transcribe  # noqa: E402
from loop.features import LogMel, pad_waveforms  # noqa: E402
from loop.model import language_code, load_for_inference  # noqa: E402

DEFAULT_MAX_DURATION_S = 600.0  # longest recording or upload the demo transcribes
DEFAULT_MAX_FILE_SIZE = "100mb"  # uploads larger than this are refused before they reach the model
TASKS = ("transcribe", "translate")


class DemoInputError(ValueError):
    """Audio the demo cannot transcribe; the message is shown to the user as it is."""


class Transcriber:
    """A saved model and its processor, decoding one file at a time as the model folder says (language and task
    can be chosen per call)."""

    def __init__(self, model_dir: str | Path, max_duration_s: float = DEFAULT_MAX_DURATION_S,
                 encoder_window: str | None = None):
        self.model, self.processor = load_for_inference(str(model_dir), encoder_window=encoder_window)
        self.log_mel = LogMel(self.processor.feature_extractor)
        self.max_duration_s = max_duration_s
        self.lock = threading.Lock()  # the generation config is switched per call: one call at a time

    @property
    def window_s(self) -> float:
        """Seconds of audio the model sees at once (30 for Whisper, less for the tiny test models)."""
        return float(self.processor.feature_extractor.chunk_length)

    @property
    def language(self) -> str:
        return self.model.generation_config.language

    @property
    def task(self) -> str:
        return self.model.generation_config.task

    def transcribe_file(self, path: str | Path | None, language: str | None = None,
                        task: str | None = None) -> tuple[str, float]:
        """(transcript, seconds spent on features and decoding) of one audio file; `language` (code or Whisper
        name) and `task` default to the model's own. Raises DemoInputError with a message for the user."""
        waveform = self.load_audio(path)
        started = time.perf_counter()
        with self.lock, decoding_as(self.model, language, task):
            audio, _ = pad_waveforms([as_cached(waveform)])  # the samples evaluation decodes from its cache
            if len(waveform) <= self.window_s * SAMPLE_RATE:
                features = batch_features(self.model, self.log_mel, audio)
                text = transcribe(self.model, features, self.processor.tokenizer)[0]
            else:
                text = transcribe_long(self.model, self.log_mel, self.processor.tokenizer, audio)
        return text, time.perf_counter() - started

    def load_audio(self, path: str | Path | None) -> np.ndarray:
        """The file as 16-kHz mono samples, or a DemoInputError saying what is wrong with it."""
        if not path:
            raise DemoInputError("No audio: record something with the microphone or upload a file first.")
        try:
            waveform = decode_audio(path)
        except AudioError as error:
            raise DemoInputError(
                f"{Path(path).name} cannot be read as audio ({error.reason}): upload a WAV, MP3, FLAC or OGG file."
            ) from error
        duration = len(waveform) / SAMPLE_RATE
        if duration > self.max_duration_s:
            raise DemoInputError(
                f"The audio is {duration:.0f} s long; this demo transcribes at most {self.max_duration_s:g} s "
                "(--max_duration_s). Cut it into shorter pieces."
            )
        return waveform

    def handle(self, path: str | None, language: str, task: str) -> tuple[str, float]:
        """The Gradio event: the transcript and decode time, or the problem shown in the page."""
        try:
            text, seconds = self.transcribe_file(path, language, task)
        except DemoInputError as error:
            raise gr.Error(str(error)) from error
        return text, round(seconds, 3)


@contextmanager
def decoding_as(model, language: str | None, task: str | None):
    """Temporarily decodes in `language`/`task` (None: the model's own), restoring the saved settings after."""
    settings = model.generation_config
    saved = settings.language, settings.task
    settings.language = language_code(language) if language else saved[0]
    settings.task = task or saved[1]
    try:
        yield
    finally:
        settings.language, settings.task = saved


@torch.no_grad()
def transcribe_long(model, log_mel: LogMel, tokenizer, audio: torch.Tensor) -> str:
    """Audio (1, samples) longer than the model's window, with Whisper's long-form generation: the features of the
    whole recording (1, n_mels, frames), untruncated, and their attention mask; generate() moves the window along
    by the timestamps the model predicts (it needs `no_timestamps_token_id` in the generation config)."""
    frames = audio.shape[1] // log_mel.hop_length
    features = log_mel(audio, n_frames=frames, truncate=False)
    settings = model.generation_config
    token_ids = model.generate(
        input_features=features, attention_mask=torch.ones((1, frames), dtype=torch.long),
        language=settings.language, task=settings.task, return_timestamps=True,
    )
    return tokenizer.batch_decode(token_ids, skip_special_tokens=True)[0].strip()


def language_choices() -> list[tuple[str, str]]:
    """(Whisper's language name, code) for every language Whisper knows, by name."""
    return sorted((name, code) for code, name in LANGUAGES.items())


def make_blocks(transcriber: Transcriber, title: str = "whisper-loop demo") -> gr.Blocks:
    """The page: audio in (microphone or upload), language and task, transcript and decode time out."""
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\nRecord or upload audio (up to {transcriber.max_duration_s:g} s). Clips up to "
            f"{transcriber.window_s:g} s are decoded in one window, longer ones window by window."
        )
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Audio")
                language = gr.Dropdown(language_choices(), value=transcriber.language, label="Language")
                task = gr.Dropdown(list(TASKS), value=transcriber.task, label="Task")
                button = gr.Button("Transcribe", variant="primary")
            with gr.Column():
                transcript = gr.Textbox(label="Transcript", lines=6)
                seconds = gr.Number(value=None, label="Decode time (s)", precision=3)
        button.click(transcriber.handle, inputs=[audio, language, task], outputs=[transcript, seconds],
                     api_name="transcribe")
    return app


def build_app(model_dir: str | Path, max_duration_s: float = DEFAULT_MAX_DURATION_S,
              encoder_window: str | None = None) -> gr.Blocks:
    """The demo app for a saved model folder (or Hub id); launch it with `launch()` or `app.launch(...)`."""
    return make_blocks(Transcriber(model_dir, max_duration_s, encoder_window), title=f"whisper-loop: {model_dir}")


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str | int = DEFAULT_MAX_FILE_SIZE, block: bool = True):
    """Serves the app on `host` (local only by default); a public share link only with `share`."""
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                      prevent_thread_lock=not block)
