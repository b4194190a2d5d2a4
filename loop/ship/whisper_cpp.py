"""The GGML export in whisper.cpp, through pywhispercpp (its own compiled whisper.cpp), for the parity gate:
greedy at temperature 0 with no fallback (`temperature_inc` 0), no previous-text context, one segment without
timestamps, no no-speech skipping, the model's language, the gate's length cap (`max_tokens`).

whisper.cpp computes the log-mel features itself, from the waveform and the mel filters in the file (its own FFT,
30 s of zero samples after the clip, the log and clamp of OpenAI's `log_mel_spectrogram`), and runs GELU through a
float16 lookup table: so its float32 transcripts may differ from transformers' by rounding, and the gate holds
them to the WER tolerance (`FRONT_END`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loop.extras import require
from loop.ship.ggml import GGML_FILE
from loop.ship.parity import ParitySettings, Runtime

FRONT_END = ("whisper.cpp computes its own log-mel features from the waveform (its own FFT and padding) and "
             "approximates GELU with a float16 table, so float32 transcripts may differ by rounding")


def transcribe_in_child(path: str, options: dict, waveforms: list[np.ndarray]) -> list[str]:
    """Runs in a child process (`whisper_cpp_runtime`): loads the file and transcribes every waveform."""
    from pywhispercpp.model import Model

    model = Model(path, redirect_whispercpp_logs_to=None, **options)
    if getattr(model, "_ctx", None) is None:  # pywhispercpp does not raise when whisper.cpp refuses the file
        raise RuntimeError(f"whisper.cpp could not load {path} (its log says why)")
    return ["".join(segment.text for segment in model.transcribe(np.ascontiguousarray(audio, dtype=np.float32)))
            .strip() for audio in waveforms]


def whisper_cpp_runtime(export_dir: str | Path, settings: ParitySettings) -> Runtime:
    """whisper.cpp over the export's GGML file, run in a child process: a file that makes whisper.cpp abort or
    crash (a failed assertion, a truncated tensor) then fails the gate instead of ending the export command."""
    require("pywhispercpp", "ggml", "the parity gate of --format ggml (whisper.cpp)")
    path = Path(export_dir) / GGML_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    options = {"language": settings.language, "translate": settings.task == "translate", "n_threads": settings.threads,
               "no_context": True, "no_timestamps": True, "single_segment": True, "suppress_blank": True,
               "temperature": 0.0, "temperature_inc": 0.0, "no_speech_thold": 2.0, "max_tokens": settings.max_new_tokens,
               "print_progress": False, "print_realtime": False}

    def transcribe(waveforms: list[np.ndarray]) -> list[str]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                return pool.submit(transcribe_in_child, str(path), options, list(waveforms)).result()
            except BrokenProcessPool as error:
                raise RuntimeError(f"whisper.cpp crashed on {path} (the process died: a failed assertion or a "
                                   "bad read of the file)") from error

    return Runtime("whisper_cpp", transcribe, {"whisper_cpp_max_tokens": settings.max_new_tokens}, FRONT_END)
