"""Export a saved Whisper (`runs/NAME/best`) to a CTranslate2 folder that faster-whisper loads as it is, with
CTranslate2's own converter (`ctranslate2.converters.TransformersConverter`); `loop.ship.parity` then checks that the
export transcribes as the model does. `scripts/export.py` is the command line.

What the converter's model.bin does not carry, and the folder needs:
- `tokenizer.json`: without it faster-whisper downloads openai/whisper-tiny's, the wrong vocabulary for a model
  with its own tokenizer, and a Hub call offline;
- `preprocessor_config.json`: faster-whisper takes the number of mel bins (`feature_size`) from it and uses 80
  when it is missing, so a 128-mel model (large-v3) would be fed features it was never trained on. transformers 5
  saves the feature extractor inside `processor_config.json` instead, so the file is written here from the model's
  own feature extractor, after checking its mel bins against the model's `num_mel_bins`.
Suppress tokens, begin-suppress tokens, language ids and alignment heads go from `generation_config.json` into the
export's config.json through the converter (alignment heads: the model's own where its generation config lists
them, as a Hub checkpoint's does, else the converter's default, the decoder's last half of layers).

Refused before converting, because faster-whisper would then decode differently from the model (each named in
the error): a window other than Whisper's 30 s (faster-whisper 1.2 pads every window to 3000 frames), a decoder
of fewer than Whisper's 448 positions (faster-whisper decodes up to 448 tokens), and a multilingual model whose
vocabulary lacks the empty-string token of Whisper's multilingual vocabulary (id 50256), by which CTranslate2 4.8
tells multilingual models from English-only ones: without it faster-whisper drops the language and task tokens.
All three hold for every Whisper checkpoint on the Hub and what is fine-tuned from one; the quickstart's tiny model
has none of them, so it does not export.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loop.extras import require
from loop.files import replace_dir, write_json_atomic, write_text_atomic

FORMATS = ("ct2",)
QUANTIZATIONS = ("float32", "float16", "int8", "int8_float16")
WINDOW_FRAMES = 3000  # faster-whisper pads or cuts every window to 3000 mel frames (30 s at a 10-ms hop)
DECODER_POSITIONS = 448  # faster-whisper lets prompt and transcript run to 448 tokens (WhisperModel.max_length)
MULTILINGUAL_MARKER = ""  # token 50256 of Whisper's multilingual vocabulary; CTranslate2 4.8 looks it up
PREPROCESSOR_FILE = "preprocessor_config.json"
COPIED_FILES = ("tokenizer.json",)
EXPORT_INFO_FILE = "export.json"


class ExportError(RuntimeError):
    """A model that cannot be exported, or an output folder that cannot be written; the message names it."""


@dataclass
class SourceModel:
    """A saved Whisper folder, read once: its config, generation config and processor."""

    folder: Path
    config: object  # WhisperConfig
    generation: object  # GenerationConfig
    processor: object  # WhisperProcessor
    label: str = ""
    """What the user passed, when `folder` is a checkpoint written out for the export (`loop.run.model_folder`)."""

    @property
    def name(self) -> str:
        return self.label or str(self.folder)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.generation, "is_multilingual", False) or getattr(self.generation, "lang_to_id", None))


def read_source_model(folder: str | Path, label: str = "") -> SourceModel:
    """The model folder `folder` (a `save_pretrained` Whisper such as runs/NAME/best), or an ExportError saying
    why it is not one."""
    from transformers import AutoConfig, GenerationConfig

    from loop.model.loading import ModelLoadError, load_processor

    folder = Path(folder)
    hint = "pass a save_pretrained Whisper folder such as runs/NAME/best (download a Hub model first)"
    if not folder.is_dir():
        raise ExportError(f"--model {folder}: no such folder; {hint}")
    if not (folder / "config.json").is_file():
        raise ExportError(f"--model {folder} is not a model folder: it has no config.json; {hint}")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:  # a config.json that is not JSON, or names an unknown model type
        raise ExportError(f"--model {folder}: cannot read its config.json: {error}") from error
    if config.model_type != "whisper":
        raise ExportError(f"--model {folder} holds a {config.model_type!r} model, not a Whisper; {hint}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ExportError(f"--model {folder} has a config.json but no weights (*.safetensors); {hint}")
    missing = [name for name in (*COPIED_FILES, "generation_config.json") if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"--model {folder} lacks {', '.join(missing)}, which the export needs; save the model and "
                          "its processor with save_pretrained (the loop's best/ has them)")
    try:
        generation = GenerationConfig.from_pretrained(folder)
        # With the label prefix the model decodes with, so the parity check prepares rows as evaluation does.
        language, task = getattr(generation, "language", None), getattr(generation, "task", None)
        processor = load_processor(str(folder), language, task)
    except (OSError, ValueError, ModelLoadError) as error:
        raise ExportError(f"--model {folder}: cannot load its generation config or processor: {error}") from error
    return SourceModel(folder, config, generation, processor, label)


def faster_whisper_problems(source: SourceModel) -> list[str]:
    """What would make faster-whisper decode `source` differently from transformers; empty when nothing does."""
    fe, config, problems = source.processor.feature_extractor, source.config, []
    if fe.feature_size != config.num_mel_bins:
        problems.append(f"its feature extractor computes {fe.feature_size} mel bins but the model takes "
                        f"{config.num_mel_bins} (config.json num_mel_bins)")
    if fe.nb_max_frames != WINDOW_FRAMES or config.max_source_positions * 2 != WINDOW_FRAMES:
        problems.append(f"its window is {fe.chunk_length} s ({config.max_source_positions} encoder positions); "
                        f"faster-whisper pads every window to {WINDOW_FRAMES} frames (30 s, 1500 positions)")
    if config.max_target_positions < DECODER_POSITIONS:
        problems.append(f"its decoder has {config.max_target_positions} positions; faster-whisper decodes up to "
                        f"{DECODER_POSITIONS} tokens and would fail on a long transcript")
    if source.multilingual and MULTILINGUAL_MARKER not in source.processor.tokenizer.get_vocab():
        problems.append("it is multilingual, but its vocabulary lacks the empty-string token of Whisper's "
                        "multilingual vocabulary, by which CTranslate2 tells multilingual models from English-only "
                        "ones: faster-whisper would drop the language and task tokens")
    return problems


def preprocessor_settings(source: SourceModel) -> dict:
    """preprocessor_config.json's content: the model's feature extractor, its mel bins checked against the model."""
    settings = source.processor.feature_extractor.to_dict()
    if settings["feature_size"] != source.config.num_mel_bins:
        raise ExportError(f"{source.name}: feature extractor has {settings['feature_size']} mel bins, the model "
                          f"{source.config.num_mel_bins}")
    return settings


def check_output_dir(output_dir: Path, model_folder: Path, overwrite: bool) -> None:
    """Refuses a folder that exists (unless `overwrite`), that is not a folder, or that holds the model itself."""
    output, model = output_dir.resolve(), model_folder.resolve()
    if output == model or output in model.parents:
        raise ExportError(f"--output_dir {output_dir} holds the model being exported ({model_folder}); "
                          "choose a folder outside it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} exists and is not a folder; choose another --output_dir")
    if output_dir.exists() and not overwrite:
        raise ExportError(f"--output_dir {output_dir} already exists; pass --overwrite to replace it, or choose "
                          "another --output_dir")


def free_space(path: Path) -> str:
    """Free space on the filesystem of `path` (or of its nearest existing parent), as text."""
    existing = path.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB free"
    except OSError:
        return "free space unknown"


def write_staged(output_dir: Path, write: Callable[[Path], None]) -> Path:
    """Runs `write(staging)` on an empty sibling folder of `output_dir`, then moves it into place: an interrupted
    export leaves no half folder behind. A failed write (a full disk) is an ExportError naming the folder and the
    free space; the staging folder is removed."""
    staging = output_dir.with_name(f".tmp-{output_dir.name}")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        replace_dir(staging, output_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"could not write the export to {output_dir}: {error.strerror or error} "
                          f"({free_space(output_dir.parent)} on its filesystem); free some space or choose another "
                          "--output_dir") from error
    return output_dir


def export_ct2(source: SourceModel, output_dir: str | Path, quantization: str, *, overwrite: bool = False,
               readme: str | None = None) -> Path:
    """Converts `source` into `output_dir` with weights stored as `quantization`, staged in a sibling folder and
    moved into place once complete (an interrupted export leaves no half folder behind). `readme` (the folder's
    README.md) is written with it. Returns the folder."""
    TransformersConverter = require("ctranslate2.converters", "export", "the export").TransformersConverter

    output_dir = Path(output_dir)
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    check_output_dir(output_dir, source.folder, overwrite)
    problems = faster_whisper_problems(source)
    if problems:
        raise ExportError(f"--model {source.name} cannot be exported for faster-whisper: {'; '.join(problems)}")

    def write(staging: Path) -> None:
        converter = TransformersConverter(str(source.folder), copy_files=list(COPIED_FILES))
        converter.convert(str(staging), quantization=quantization, force=True)
        write_json_atomic(staging / PREPROCESSOR_FILE, preprocessor_settings(source))
        write_json_atomic(staging / EXPORT_INFO_FILE, export_info(source, quantization))
        if readme is not None:
            write_text_atomic(staging / "README.md", readme)

    write_staged(output_dir, write)
    return output_dir


def export_info(source: SourceModel, quantization: str) -> dict:
    """export.json: where the export came from and with what, for whoever finds the folder later."""
    import transformers

    ctranslate2 = require("ctranslate2", "export", "the export")

    return {"source": source.name, "format": "ct2", "quantization": quantization,
            "num_mel_bins": source.config.num_mel_bins, "multilingual": source.multilingual,
            "language": getattr(source.generation, "language", None), "task": getattr(source.generation, "task", None),
            "versions": {"ctranslate2": ctranslate2.__version__, "transformers": transformers.__version__}}


def faster_whisper_snippet(model_location: str, language: str | None, task: str, num_beams: int) -> list[str]:
    """Python lines that transcribe a file with the exported model in faster-whisper, the audio decoded and
    resampled to 16 kHz as the loop does it (soundfile and soxr, no FFmpeg)."""
    language_argument = f'language="{language}", ' if language else ""
    return [
        "```python",
        "import soundfile",
        "import soxr",
        "from faster_whisper import WhisperModel",
        "",
        f'model = WhisperModel("{model_location}")  # device="cuda" on a GPU',
        'audio, rate = soundfile.read("clip.mp3", dtype="float32")  # soundfile reads MP3 without FFmpeg',
        "if audio.ndim == 2:  # stereo: average the channels",
        "    audio = audio.mean(axis=1)",
        "audio = soxr.resample(audio, rate, 16000)  # Whisper hears 16 kHz",
        "# temperature 0: decode as the model was evaluated (faster-whisper's default falls back to sampling)",
        f'segments, info = model.transcribe(audio, {language_argument}task="{task}", beam_size={num_beams}, '
        "temperature=0.0)",
        'print("".join(segment.text for segment in segments).strip())',
        "```",
    ]


def export_readme(source: SourceModel, output_dir: str | Path, quantization: str) -> str:
    """The export folder's README.md: what it is, how it was made, and how to use it."""
    generation = source.generation
    language, task = getattr(generation, "language", None), getattr(generation, "task", None) or "transcribe"
    return "\n".join([
        f"# {Path(source.label).name if source.label else Path(source.folder).resolve().name} for faster-whisper "
        f"({quantization})", "",
        f"`{source.name}` converted to CTranslate2 with whisper-loop's `scripts/export.py` (CTranslate2's "
        f"`TransformersConverter`, weights stored as {quantization}, {source.config.num_mel_bins} mel bins). "
        "`parity.json`, when present, compares its transcripts with the transformers model's on the same audio.", "",
        "## How to use", "",
        *faster_whisper_snippet(str(output_dir), language, task, getattr(generation, "num_beams", None) or 1), "",
        "On a CPU, `compute_type=\"int8\"` runs any export in int8; see CTranslate2's quantization docs.", "",
    ])
