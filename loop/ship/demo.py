"""A Gradio demo of a saved model: record, upload or click a shipped clip, get the transcript and the decode time.

Clips within the model's audio window decode through `loop.eval.evaluation.transcribe`, exactly as the training loop
and `scripts/evaluate.py` decode; longer ones (up to `max_duration_s`) through Whisper's sequential long-form
generation (`LONG_FORM`), with a progress bar. Audio is read with `loop.data.audio.decode_audio` (soundfile + soxr, no
FFmpeg), after checks that refuse what it should not try: an empty recording, a file over the size limit (Gradio
refuses it at upload) or over the duration limit (read from the header, before decoding a sample).

Under load, requests wait in Gradio's queue (at most `max_queue`) and run one at a time: the model is shared and
its generation config is switched per call, and a second concurrent decode would only split the same cores.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import numpy as np  # noqa: E402
from transformers.models.whisper.tokenization_whisper import LANGUAGES  # noqa: E402

from loop.data.audio import SAMPLE_RATE, as_cached  # noqa: E402
from loop.eval.long_form import transcribe_long  # noqa: E402
from loop.extras import require  # noqa: E402
from loop.languages import language_code  # noqa: E402
from loop.model.decoding import transcribe  # noqa: E402
from loop.model.encoder_window import batch_features, saved_encoder_window  # noqa: E402
from loop.model.features import LogMel, pad_waveforms  # noqa: E402
from loop.model.loading import load_companion  # noqa: E402
from loop.run.model_folder import load_inference_model  # noqa: E402
from loop.ship.demo_sources import card_name, example_clips, wav_header_note  # noqa: E402
from loop.ship.uploads import AudioInputError, read_audio  # noqa: E402

gr = require("gradio", "demo", "the demo")

DEFAULT_MAX_DURATION_S = 600.0  # longest recording or upload the demo transcribes
DEFAULT_MAX_FILE_SIZE = "100mb"  # uploads larger than this are refused before they reach the model
DEFAULT_MAX_QUEUE = 32  # requests waiting at once; more are refused with Gradio's "queue is full"
TASKS = ("transcribe", "translate")
LONG_FORM = (
    "Recordings longer than the window are transcribed with Whisper's **sequential long-form decoding** (as "
    "`scripts/evaluate.py --long_form` scores it): the model reads one window, predicts timestamps, and the next "
    "window starts where its last complete segment ended, so no word is cut at a fixed border. Chunked decoding "
    "(fixed overlapping chunks, merged afterwards) is faster on a GPU batch but cuts words at chunk borders and is "
    "reported to add WER (transformers#37789)."
)


DemoInputError = AudioInputError  # audio the demo cannot transcribe; the message is shown to the user as it is

class Transcriber:
    """A saved model and its processor, decoding one file at a time as the model folder says (language and task
    can be chosen per call)."""

    def __init__(self, model_dir: str | Path, max_duration_s: float = DEFAULT_MAX_DURATION_S,
                 encoder_window: str | None = None, assistant_model: str | None = None):
        self.model, self.processor = load_inference_model(str(model_dir), encoder_window=encoder_window)
        self.assistant = assistant_model and load_companion(  # speculative decoding: loop.model.decoding.assisted_ids
            assistant_model, self.model, self.processor.tokenizer, "--assistant_model",
            encoder_window=saved_encoder_window(self.model)[0])
        self.log_mel = LogMel(self.processor.feature_extractor)
        self.max_duration_s = max_duration_s
        self.lock = threading.Lock()  # the generation config is switched per call: one call at a time
        self.in_flight = 0
        """Requests inside `handle` now; Gradio's queue keeps it at 1."""
        self.most_in_flight = 0
        """The most requests ever inside `handle` at once (shown to be 1 under load by tests/test_demo_load.py)."""
        self._counting = threading.Lock()

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

    def transcribe_file(self, path: str | Path | None, language: str | None = None, task: str | None = None,
                        progress=None) -> tuple[str, float]:
        """(transcript, seconds spent on features and decoding) of one audio file; `language` (code or Whisper
        name) and `task` default to the model's own; `progress(share)` is called as long-form decoding moves on.
        Raises DemoInputError with a message for the user."""
        waveform = self.load_audio(path)
        started = time.perf_counter()
        with self.lock, decoding_as(self.model, language, task):
            audio, _ = pad_waveforms([as_cached(waveform)])  # the samples evaluation decodes from its cache
            if len(waveform) <= self.window_s * SAMPLE_RATE:
                features = batch_features(self.model, self.log_mel, audio)
                text = transcribe(self.model, features, self.processor.tokenizer, self.assistant or None)[0]
            else:
                text = transcribe_long(self.model, self.log_mel, self.processor.tokenizer, audio, progress=progress)
        return text, time.perf_counter() - started

    def load_audio(self, path: str | Path | None) -> np.ndarray:
        """The file as 16-kHz mono samples, or a DemoInputError saying what is wrong with it
        (`loop.ship.uploads.read_audio`, the checks the server makes too)."""
        return read_audio(path, self.max_duration_s)

    # Gradio finds the progress bar by this default value, its documented idiom.
    def handle(self, path: str | None, language: str, task: str,
               progress=gr.Progress()) -> tuple[str, float]:  # noqa: B008
        """The Gradio event: the transcript and decode time, or the problem shown in the page (a WAV whose header
        claims more audio than the file holds is transcribed as far as it goes, with a warning)."""
        with self._counting:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            note = wav_header_note(path) if path else None
            if note:
                gr.Warning(note)
            text, seconds = self.transcribe_file(path, language, task,
                                                 lambda share: progress(share, desc="long-form decoding"))
        except DemoInputError as error:
            raise gr.Error(str(error)) from error
        finally:
            with self._counting:
                self.in_flight -= 1
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


def language_choices() -> list[tuple[str, str]]:
    """(Whisper's language name, code) for every language Whisper knows, by name."""
    return sorted((name, code) for code, name in LANGUAGES.items())


def make_blocks(transcriber: Transcriber, title: str = "whisper-loop demo",
                examples: list[tuple[str, str]] = (), max_queue: int = DEFAULT_MAX_QUEUE) -> gr.Blocks:
    """The page: audio in (microphone, upload or one of `examples`, (path, transcript) pairs), language and task,
    transcript and decode time out; requests queue (at most `max_queue` waiting) and run one at a time."""
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\nRecord or upload audio (up to {transcriber.max_duration_s:g} s), or click a clip below. "
            f"Clips up to {transcriber.window_s:g} s are decoded in one window. {LONG_FORM} Requests are queued and "
            "transcribed one at a time."
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
        if examples:
            gr.Examples([[path] for path, _ in examples], inputs=[audio], label="Clips to try (reference transcript)",
                        example_labels=[text for _, text in examples])
        button.click(transcriber.handle, inputs=[audio, language, task], outputs=[transcript, seconds],
                     api_name="transcribe", concurrency_limit=1)
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    return app


def build_app(model_dir: str | Path, max_duration_s: float = DEFAULT_MAX_DURATION_S,
              encoder_window: str | None = None, examples: str | Path | None = "",
              max_queue: int = DEFAULT_MAX_QUEUE, assistant_model: str | None = None) -> gr.Blocks:
    """The demo app for a saved model folder (or Hub id), named by its model card; launch it with `launch()`.
    `examples`: a Common Voice folder whose test split offers clips to click ("": the shipped synthetic corpus;
    None: none); `assistant_model`: a smaller model with the same tokenizer, for speculative decoding."""
    transcriber = Transcriber(model_dir, max_duration_s, encoder_window, assistant_model)
    clips = example_clips(examples) if examples is not None else []
    return make_blocks(transcriber, title=f"whisper-loop: {card_name(model_dir)}", examples=clips,
                       max_queue=max_queue)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str | int = DEFAULT_MAX_FILE_SIZE, block: bool = True):
    """Serves the app on `host` (local only by default); a public share link only with `share`."""
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                      prevent_thread_lock=not block)
