"""The GGML export in whisper.cpp, through pywhispercpp (its own compiled whisper.cpp), for the parity gate:
greedy at temperature 0 with no fallback (`temperature_inc` 0), no previous-text context, one segment without
timestamps, no no-speech skipping, the model's language, the gate's length cap. whisper.cpp checks `max_tokens`
after keeping the token it counts (`max_tokens` 10 gives 11 tokens, measured), so it is given the cap less one.

Flash attention off (`flash_attn`, a context parameter, on by default in recent whisper.cpp, the one
pywhispercpp 1.5.1 bundles included): ggml's CPU kernel for it accumulates the attention-weighted values of the
float16 cache in float16, and that rounding, not the float16 weights nor whisper.cpp's own features, is what moved
whisper.cpp's greedy choices away from transformers' (docs/export-formats.md: on openai/whisper-base, 2 of 10
transcripts identical with it, 10 of 10 without).

Suppressed tokens: whisper.cpp takes no list of ids. It always suppresses the special tokens (start, task,
language, no-speech, previous-text, timestamps when off) and, at the first step with `suppress_blank`, the space
and end tokens (transformers' begin-suppress tokens). The model's `suppress_tokens` (OpenAI's non-speech symbols)
are what `suppress_nst` suppresses, off by default in whisper.cpp: without it whisper.cpp could emit "(", "♪" or
" -" where transformers cannot. Its list is looked up as whole tokens, so it misses the tokens OpenAI's list adds
as the first piece of a multi-token symbol (in Whisper's vocabulary ids 873 and 3268, the bytes E2 99 that
begin "♪", after a space and alone): `parity.json` lists the model's suppressed ids whisper.cpp does not
suppress (`whisper_cpp_unsuppressed`).

whisper.cpp computes the log-mel features itself, from the waveform and the mel filters in the file (its own FFT,
30 s of zero samples after the clip, the log and clamp of OpenAI's `log_mel_spectrogram`), and runs GELU through a
float16 lookup table: so its float32 transcripts may differ from transformers' by rounding, and the gate holds
them to the WER tolerance (`FRONT_END`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loop.extras import require
from loop.ship.ggml import GGML_FILE, read_vocabulary
from loop.ship.parity import ParitySettings, Runtime

FRONT_END = ("whisper.cpp computes its own log-mel features from the waveform (its own FFT and padding) and "
             "approximates GELU with a float16 table, so float32 transcripts may differ by rounding")

# whisper.cpp's `non_speech_tokens` (src/whisper.cpp): suppressed with `suppress_nst`, each where the vocabulary
# holds it as one token, alone and after a space, with " -" and " '".
NON_SPEECH_SYMBOLS = ('"', "#", "(", ")", "*", "+", "/", ":", ";", "<", "=", ">", "@", "[", "\\", "]", "^", "_", "`",
                      "{", "|", "}", "~", "「", "」", "『", "』", "<<", ">>", "<<<", ">>>", "--", "---", "-(", "-[",
                      "('", '("', "((", "))", "(((", ")))", "[[", "]]", "{{", "}}", "♪♪", "♪♪♪", "♩", "♪", "♫",
                      "♬", "♭", "♮", "♯")
CONTEXT = {"flash_attn": False}  # whisper.cpp's context parameters for the gate (module docstring)
LISTED = 20  # ids parity.json lists of each difference (a model may suppress thousands of unused tokens)


def non_speech_ids(tokens: list[bytes]) -> set[int]:
    """The ids whisper.cpp suppresses with `suppress_nst` in a vocabulary (`tokens`: the regular tokens as the
    GGML file stores them, in id order)."""
    ids = {token: index for index, token in enumerate(tokens)}  # whisper.cpp's token_to_id: a later twin wins
    texts = [*(text for symbol in NON_SPEECH_SYMBOLS for text in (symbol, " " + symbol)), " -", " '"]
    return {ids[text.encode()] for text in texts if text.encode() in ids}


def suppression(path: Path, suppress_tokens: list[int]) -> dict:
    """How whisper.cpp is told to suppress the model's `suppress_tokens` (module docstring), and what it then
    suppresses differently: the regular tokens of the model's list it leaves, and those it adds."""
    tokens = read_vocabulary(path)
    wanted = {token for token in suppress_tokens if 0 <= token < len(tokens)}  # the special ones: always
    suppressed = non_speech_ids(tokens) if wanted else set()
    left, added = sorted(wanted - suppressed), sorted(suppressed - wanted)
    return {"whisper_cpp_suppress_nst": bool(wanted), "whisper_cpp_unsuppressed": left[:LISTED],
            "whisper_cpp_unsuppressed_count": len(left), "whisper_cpp_extra_suppressed": added[:LISTED],
            "whisper_cpp_extra_suppressed_count": len(added)}


def transcribe_in_child(path: str, options: dict, waveforms: list[np.ndarray]) -> list[str]:
    """Runs in a child process (`whisper_cpp_runtime`): loads the file and transcribes every waveform."""
    from pywhispercpp.model import Model

    model = Model(path, redirect_whispercpp_logs_to=None, context_params=CONTEXT, **options)
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
    suppressing = suppression(path, settings.suppress_tokens)
    options = {"language": settings.language, "translate": settings.task == "translate", "n_threads": settings.threads,
               "no_context": True, "no_timestamps": True, "single_segment": True, "suppress_blank": True,
               "suppress_nst": suppressing["whisper_cpp_suppress_nst"],
               "temperature": 0.0, "temperature_inc": 0.0, "no_speech_thold": 2.0,
               "max_tokens": max(settings.max_new_tokens - 1, 1),
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

    told = {"whisper_cpp_max_tokens": options["max_tokens"], "whisper_cpp_flash_attn": CONTEXT["flash_attn"],
            **suppressing}
    return Runtime("whisper_cpp", transcribe, told, FRONT_END)
