"""The checks an uploaded or recorded file passes before a model hears it, shared by the demo (`loop.ship.demo`)
and the server (`loop.ship.serve`): no audio at all, a duration over the limit (read from the header first, so a
file of hours is refused without decoding it into memory), a file that is not audio, and an empty recording.
Each failure is an `AudioInputError` whose message is shown to the user as it is and whose `status` is the HTTP
status the server answers with (400 empty, 413 too long, 415 not audio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from loop.data.audio import SAMPLE_RATE, AudioError, decode_audio

BAD_REQUEST, TOO_LARGE, UNSUPPORTED = 400, 413, 415


class AudioInputError(ValueError):
    """Audio that cannot be transcribed; the message is for the user, `status` the HTTP status that says so."""

    def __init__(self, message: str, status: int = BAD_REQUEST, code: str = "invalid_audio"):
        super().__init__(message)
        self.status, self.code = status, code


def too_long(duration: float, max_duration_s: float, service: str) -> AudioInputError:
    return AudioInputError(f"The audio is {duration:.0f} s long; {service} transcribes at most {max_duration_s:g} s "
                           "(--max_duration_s). Cut it into shorter pieces.", TOO_LARGE, "audio_too_long")


def read_audio(path: str | Path | None, max_duration_s: float, service: str = "this demo") -> np.ndarray:
    """The file as 16-kHz mono samples, or an AudioInputError saying what is wrong with it (`service` names who
    refuses, in the message)."""
    if not path:
        raise AudioInputError("No audio: record something with the microphone or upload a file first.",
                              BAD_REQUEST, "no_audio")
    try:
        claimed = soundfile.info(str(path)).duration
    except RuntimeError:  # LibsndfileError: not a format it knows, or a broken header; decode_audio says which
        claimed = 0.0
    if claimed > max_duration_s:
        raise too_long(claimed, max_duration_s, service)
    try:
        waveform = decode_audio(path)
    except AudioError as error:
        if error.reason == "empty_audio":
            raise AudioInputError(f"{Path(path).name} is an empty recording (no samples): record again, or upload "
                                  "another file.", BAD_REQUEST, "empty_audio") from error
        raise AudioInputError(f"{Path(path).name} cannot be read as audio ({error.reason}): upload a WAV, MP3, FLAC "
                              "or OGG file.", UNSUPPORTED, "not_audio") from error
    duration = len(waveform) / SAMPLE_RATE
    if duration > max_duration_s:
        raise too_long(duration, max_duration_s, service)
    return waveform
