"""The runtimes the parity gate (`loop.ship.parity`) runs each export format in: each turns the export folder into
a `Runtime`, "transcribe these 16-kHz waveforms" under the gate's greedy settings, and nothing else.

- ct2 -> faster-whisper. Its defaults differ from transformers' in several places, each set here: beam 1, one
  temperature, no compression-ratio, log-prob or no-speech thresholds, no VAD, no previous-text prompt, the same
  suppress tokens (faster-whisper adds its task and start tokens, which a trained model never emits mid-transcript)
  and begin-suppress tokens (CTranslate2's `suppress_blank` applies the export's `suppress_ids_begin`), and a
  `max_new_tokens` that CTranslate2's halving of it brings back to the gate's cap. The encoder input: transformers
  pads each clip with silence to the 30-s window before computing features, while faster-whisper computes features
  of the clip alone and pads them with zeros, a value silence never has. So faster-whisper gets each clip padded to
  30 s with zero samples, and the features agree to float rounding. It is also run on the clips as they are
  (`faster_whisper_unpadded`, the way `model.transcribe(clip)` is called), reported but not checked: that
  difference is faster-whisper's front end, not the export's.
- ggml -> whisper.cpp through pywhispercpp (`loop.ship.whisper_cpp`).
- onnx -> onnxruntime with the greedy loop of `loop.ship.onnx_decode`, fed the model's own features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loop.extras import require
from loop.ship.parity import (
    DEFAULT_WER_TOLERANCE,
    Clip,
    ParitySettings,
    Runtime,
    judge,
    mark,
    reference_side,
)


def pad_to(waveform: np.ndarray, samples: int) -> np.ndarray:
    """`waveform` followed by zero samples up to `samples` (as transformers' feature extractor pads)."""
    return np.pad(waveform, (0, samples - len(waveform))) if len(waveform) < samples else waveform


def faster_whisper_runtime(export_dir: str | Path, settings: ParitySettings) -> Runtime:
    """A CTranslate2 export in faster-whisper (module docstring)."""
    WhisperModel = require("faster_whisper", "export", "the parity gate of --format ct2").WhisperModel
    whisper = WhisperModel(str(export_dir), device=settings.device, compute_type="default",
                           cpu_threads=settings.threads)
    options = {
        "language": settings.language, "task": settings.task, "beam_size": 1, "best_of": 1,
        "temperature": settings.temperature, "without_timestamps": True, "condition_on_previous_text": False,
        "compression_ratio_threshold": None, "log_prob_threshold": None, "no_speech_threshold": None,
        "vad_filter": False, "suppress_blank": True, "suppress_tokens": settings.suppress_tokens,
        # CTranslate2 generates at most half of max_length, prompt included: this brings it back to the cap.
        "max_new_tokens": 2 * settings.max_new_tokens - len(settings.prompt_tokens),
    }

    def run(waveforms: list[np.ndarray], pad: bool = True) -> list[str]:
        texts = []
        for audio in waveforms:
            segments, _ = whisper.transcribe(pad_to(audio, settings.window_samples) if pad else audio, **options)
            texts.append("".join(segment.text for segment in segments).strip())
        return texts

    return Runtime("faster_whisper", run,
                   {"compute_type": whisper.model.compute_type,
                    "faster_whisper_max_new_tokens": options["max_new_tokens"]},
                   reported={"faster_whisper_unpadded": lambda waveforms: run(waveforms, pad=False)})


def whisper_cpp_runtime(export_dir: str | Path, settings: ParitySettings) -> Runtime:
    from loop.ship.whisper_cpp import whisper_cpp_runtime as make

    return make(export_dir, settings)


def onnx_runtime(export_dir: str | Path, settings: ParitySettings) -> Runtime:
    from loop.ship.onnx_decode import onnx_runtime as make

    return make(export_dir, settings)


RUNTIMES = {"ct2": faster_whisper_runtime, "ggml": whisper_cpp_runtime, "onnx": onnx_runtime}
RUNTIME_NAMES = {"ct2": "faster_whisper", "ggml": "whisper_cpp", "onnx": "onnxruntime"}


def open_runtime(export_format: str, export_dir: str | Path, settings: ParitySettings) -> Runtime:
    """The runtime of `export_format` ("ct2", "ggml", "onnx") over the folder `export_dir`."""
    if export_format not in RUNTIMES:
        raise ValueError(f"format {export_format!r} is not one of {', '.join(RUNTIMES)}")
    return RUNTIMES[export_format](export_dir, settings)


def run_parity(model_dir: str | Path, export_dir: str | Path, quantization: str, clips: list[Clip], *,
               export_format: str = "ct2", split: str = "", wer_tolerance: float = DEFAULT_WER_TOLERANCE,
               device: str = "cpu", batch_size: int = 8) -> dict:
    """The gate (`loop.ship.parity`) for the export of `model_dir` in `export_dir`: writes parity.json (and FAILED
    on failure) and returns the report. An export its runtime cannot load or run fails the gate the same way,
    with the runtime's error as the failure."""
    reference = reference_side(model_dir, clips, device, batch_size)
    try:
        runtime = open_runtime(export_format, export_dir, reference.settings)
        return judge(reference, runtime, export_dir, export_format, quantization, clips, split=split,
                     wer_tolerance=wer_tolerance)
    except Exception as error:  # noqa: BLE001 - any runtime error on an export is the export failing the gate
        if isinstance(error, ImportError):
            raise
        report = {"model": str(model_dir), "export": str(export_dir), "format": export_format,
                  "runtime": RUNTIME_NAMES[export_format], "quantization": quantization, "split": split,
                  "num_clips": len(clips), "passed": False,
                  "failures": [f"the {quantization} {export_format} export cannot be run by "
                               f"{RUNTIME_NAMES[export_format]}: {type(error).__name__}: {error}"]}
        mark(Path(export_dir), report)
        return report
