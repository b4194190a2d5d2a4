"""The model card of a run's `best/` folder (README.md with the Hub's metadata block) and its upload to the Hub.

The card is built only from the run's config and results.json: no token, environment variable or local path
other than the dataset's folder name goes into it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from loop.config import HUB_ID, RunConfig, resolve_path
from loop.files import write_text_atomic
from loop.languages import language_code, language_name
from loop.ship.export import ExportError, faster_whisper_problems, faster_whisper_snippet, read_source_model

LICENSE = "apache-2.0"  # Whisper's license; fine-tuned weights keep it
TAGS = ["automatic-speech-recognition", "whisper", "whisper-loop", "hf-asr-leaderboard"]
# A real release folder, e.g. cv-corpus-17.0-2024-03-15 (the synthetic corpus in assets/ does not match)
CV_RELEASE = re.compile(r"^cv-corpus-(\d+)\.(\d+)-\d{4}-\d{2}-\d{2}$")


class HubUploadError(RuntimeError):
    """`best/` could not be pushed; the message names the repository and what to check."""


def dataset_id(config: RunConfig) -> str:
    """The dataset as the Hub names it: `mozilla-foundation/common_voice_17_0` for an extracted Common Voice
    release, the dataset id for a Hub source, else the local folder's name."""
    data = config.data
    if data.source == "hub":
        return data.dataset_name
    path = resolve_path(data.path) if data.path else Path("local-data")
    for folder in (path, path.parent):  # the release root, or its <locale>/ folder
        match = CV_RELEASE.match(folder.name)
        if data.source == "common_voice" and match:
            return f"mozilla-foundation/common_voice_{match.group(1)}_{match.group(2)}"
    name = path.parent.name if data.source == "common_voice" and path.name == data.locale else path.name
    return name or "local-data"


def dataset_title(config: RunConfig) -> str:
    identifier = dataset_id(config)
    match = re.match(r"mozilla-foundation/common_voice_(\d+)_(\d+)$", identifier)
    if match:
        return f"Common Voice {match.group(1)}.{match.group(2)} ({language_name(config.model.language).title()})"
    return identifier


def dataset_config_name(config: RunConfig) -> str:
    return config.data.dataset_config if config.data.source == "hub" else config.data.locale


def base_model(config: RunConfig) -> str | None:
    """The Hub id the run started from; None for a local folder (the Hub rejects a base_model it does not know)."""
    name = config.model.name_or_path
    if resolve_path(name).exists() or not HUB_ID.match(name) or "/" not in name:
        return None
    return name


def model_name(config: RunConfig) -> str:
    return config.train.hub_model_id.split("/")[-1] if config.train.hub_model_id else Path(config.output_dir).name


def metadata(results: dict, config: RunConfig) -> dict:
    """The YAML front matter: language, license, base model, datasets, tags, metrics and the model-index entry
    that the Hub shows as evaluation results."""
    values = [{"type": "wer", "value": _rounded(results.get("test_wer")), "name": "WER"},
              {"type": "cer", "value": _rounded(results.get("test_cer")), "name": "CER"}]
    card = {
        "language": [language_code(config.model.language)],
        "license": LICENSE,
        **({"base_model": base_model(config)} if base_model(config) else {}),
        "datasets": [dataset_id(config)],
        "tags": list(TAGS),
        "metrics": ["wer", "cer"],
        "model-index": [{
            "name": model_name(config),
            "results": [{
                "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                "dataset": {"name": dataset_title(config), "type": dataset_id(config),
                            "config": dataset_config_name(config),
                            "split": results.get("test_split", config.data.eval_split),
                            "args": {"language": language_code(config.model.language)}},
                "metrics": [v for v in values if v["value"] is not None],
            }],
        }],
    }
    return card


def _rounded(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def hyperparameter_lines(results: dict, config: RunConfig) -> list[str]:
    t, e = config.train, config.eval
    processes = results.get("num_processes", 1)
    effective = results.get("effective_batch_size") or (
        t.per_device_train_batch_size * t.gradient_accumulation_steps * processes)
    rows = [
        ("learning_rate", t.learning_rate),
        ("lr schedule", f"linear warmup over {t.warmup_steps} steps, then linear decay to 0"),
        ("optimizer", f"AdamW, weight decay {t.weight_decay}, gradient clipping {t.max_grad_norm}"),
        ("per_device_train_batch_size", t.per_device_train_batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("processes", processes),
        ("effective batch size", effective),
        ("warmup_steps", t.warmup_steps),
        ("max_steps", t.max_steps),
        ("mixed_precision", results.get("mixed_precision", t.mixed_precision)),
        ("seed", t.seed),
        ("per_device_eval_batch_size", e.per_device_eval_batch_size),
        ("generation_max_length", e.generation_max_length),
        ("generation_num_beams", e.generation_num_beams),
    ]
    return ["| setting | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def results_lines(results: dict, config: RunConfig) -> list[str]:
    selection = results.get("selection_split", "selection split")
    test = results.get("test_split", config.data.eval_split)
    lines = [
        "| measure | value |", "|---|---|",
        f"| WER before training, on {selection} | {_number(results.get('initial_wer'))} |",
        f"| best WER, on {selection} (step {results.get('best_step', '-')}) | {_number(results.get('best_wer'))} |",
        f"| final WER, on {selection} | {_number(results.get('final_wer'))} |",
        f"| **{test} WER** | **{_number(results.get('test_wer'))}** |",
        f"| {test} CER | {_number(results.get('test_cer'))} |",
        f"| {test} WER, normalized | {_number(results.get('test_normalized_wer'))} |",
        f"| {test} CER, normalized | {_number(results.get('test_normalized_cer'))} |",
        f"| {test} utterances | {results.get('test_utterances', '-')} |",
    ]
    lines += ["", "Rates are corpus-level percentages. Normalized: punctuation removed and case folded; unlike "
              "Whisper's basic normalizer, Devanagari vowel signs are kept, so they still count as errors."]
    if results.get("selection_leaks_test"):
        lines += ["", f"**Note: the {test} split was also used for model selection** (the best checkpoint was "
                  f"chosen by its {test} WER, as in the reference recipe), so the {test} WER above is optimistic: "
                  "it is not a held-out estimate."]
    else:
        lines += ["", f"The checkpoint was selected on {selection}; the {test} split was evaluated once, at the end, "
                  "and never used for selection."]
    return lines


def keeping_lines(results: dict) -> list[str]:
    """"What it kept": each guard set's WER and language ID before fine-tuning and at the selected step, and the
    selection split's language ID and loops, so a reader sees the cost of the gain at a glance."""
    guards = results.get("guard_sets") or {}
    language_id = results.get("selection_language_id") or {}
    if not guards and language_id.get("initial") is None:
        return []
    lines = ["## What it kept", "",
             "| evaluation set | WER before | WER at the selected step | language ID before | language ID after |",
             "|---|---|---|---|---|"]
    if language_id.get("initial") is not None:
        lines.append(f"| {results.get('selection_split', 'selection split')} | {_number(results.get('initial_wer'))} "
                     f"| {_number(results.get('best_wer'))} | {_number(language_id.get('initial'))}% "
                     f"| {_number(language_id.get('best'))}% |")
    for name, figures in guards.items():
        before, after = figures.get("initial") or {}, figures.get("best") or {}
        lines.append(f"| guard set {name} | {_number(before.get('wer'))} | {_number(after.get('wer'))} "
                     f"| {_number(before.get('language_id'))}% | {_number(after.get('language_id'))}% |")
    lines += ["", "Language ID: the share of utterances whose language Whisper detects, unforced, as the set's own. "
              "Guard sets are decoded in their own language and never choose the model.", ""]
    return lines


def usage_lines(repo_or_path: str, config: RunConfig) -> list[str]:
    """The card's "How to use": the transformers pipeline on 16-kHz audio. The pipeline resamples other rates
    only with torchaudio, which whisper-loop does not install, so the snippet resamples with soxr first, as the
    loop does (tests/test_model_card.py runs it as written)."""
    language = language_name(config.model.language)
    return [
        "```python",
        "import soundfile",
        "import soxr",
        "from transformers import pipeline",
        "",
        f'asr = pipeline("automatic-speech-recognition", model="{repo_or_path}")',
        'audio, rate = soundfile.read("clip.mp3", dtype="float32")  # soundfile reads MP3 without FFmpeg',
        "if audio.ndim == 2:  # stereo: average the channels",
        "    audio = audio.mean(axis=1)",
        "audio = soxr.resample(audio, rate, 16000)  # Whisper hears 16 kHz; the pipeline would need torchaudio",
        f'result = asr({{"raw": audio, "sampling_rate": 16000}}, generate_kwargs={{"language": "{language}", '
        f'"task": "{config.model.task}"}})',
        'print(result["text"].strip())',
        "```",
        "",
        "`pip install transformers torch soundfile soxr` is all it needs. Evaluate it on a Common Voice split with "
        "whisper-loop's `scripts/evaluate.py` (metrics, per-utterance predictions and an error report; point "
        "`--data.path` at your extracted release):",
        "",
        "```bash",
        f"python scripts/evaluate.py --model {repo_or_path} --data.path /data/cv-corpus-17.0-2024-03-15 "
        f"--data.eval_split {config.data.eval_split} --output_dir runs/eval --html",
        "```",
    ]


def faster_whisper_lines(repo_or_path: str, config: RunConfig, from_hub: bool) -> list[str]:
    """How to run the model in faster-whisper: export it with whisper-loop's `scripts/export.py` (CTranslate2's
    converter plus a parity check), then load the folder."""
    folder = f"{model_name(config)}-ct2-int8"
    source = repo_or_path
    lines = ["```bash"]
    if from_hub:  # the export reads a local folder
        source = model_name(config)
        lines.append(f"hf download {repo_or_path} --local-dir {source}")
    lines += [f"python scripts/export.py --model {source} --quantization int8 --output_dir {folder}", "```", "",
              f"The export writes `{folder}/parity.json`: the same clips transcribed by this model and by the export, "
              "and fails when they disagree more than quantization explains. Then:", ""]
    return lines + faster_whisper_snippet(folder, language_code(config.model.language), config.model.task,
                                          config.eval.generation_num_beams)


def other_runtime_lines(repo_or_path: str, config: RunConfig, from_hub: bool) -> list[str]:
    """How to run the model in whisper.cpp, in onnxruntime, and behind OpenAI's transcription API, with
    whisper-loop's scripts (each export passes the same parity gate as the faster-whisper one)."""
    name = model_name(config)
    source = name if from_hub else repo_or_path  # the exports read a local folder (downloaded as above)
    return [
        "```bash",
        f"python scripts/export.py --model {source} --format ggml --quantization q8_0 --output_dir {name}-ggml",
        f"whisper-cli -m {name}-ggml/ggml-model.bin -l {language_code(config.model.language)} -nf --no-flash-attn "
        "--suppress-nst -f clip.wav",
        f"python scripts/export.py --model {source} --format onnx --output_dir {name}-onnx",
        f"python scripts/serve.py --model {source} --port 8000  # POST /v1/audio/transcriptions",
        "```", "",
        "Each export transcribes the test clips again and writes `parity.json`, failing (and leaving a `FAILED` "
        "file) when its transcripts disagree with this model's more than its weights explain; whisper-loop's "
        "docs/export-formats.md describes the files.",
    ]


def render_model_card(results: dict, config: RunConfig, export_problems: list[str] | None = None) -> str:
    """The card's text. `export_problems` (`loop.ship.export.faster_whisper_problems` of the model) replace the
    faster-whisper section's commands by the reasons the model does not export."""
    front_matter = yaml.safe_dump(metadata(results, config), sort_keys=False, allow_unicode=True)
    from_hub = bool(config.train.hub_model_id)  # push_to_hub requires it (config_loading.validate)
    repo_or_path = config.train.hub_model_id or str(Path(config.output_dir) / "best")
    # The title is the name users load the model by: the Hub repository, else the run's folder.
    name = config.train.hub_model_id or model_name(config)
    start = base_model(config) or f"The local checkpoint `{Path(config.model.name_or_path).name}`"
    lines = [
        "---", front_matter.rstrip(), "---", "",
        f"# {name}", "",
        f"{start} fine-tuned for {language_name(config.model.language).title()} speech recognition "
        f"({config.model.task}) on "
        f"{dataset_title(config)} ({', '.join(config.data.train_splits)} splits) with "
        "whisper-loop, a plain Accelerate training loop.", "",
        "## Results", "", *results_lines(results, config), "",
        *keeping_lines(results),
        "## Training hyperparameters", "", *hyperparameter_lines(results, config), "",
        "## How to use", "", *usage_lines(repo_or_path, config), "",
        "## Run it in faster-whisper", "",
        *(faster_whisper_lines(repo_or_path, config, from_hub) if not export_problems else
          [f"This model does not run in faster-whisper as it is: {'; '.join(export_problems)}."]), "",
    ]
    if not export_problems:  # the same 30-s window and decoder length the other runtimes need
        lines += ["## Run it in whisper.cpp, onnxruntime or an OpenAI-compatible server", "",
                  *other_runtime_lines(repo_or_path, config, from_hub), ""]
    versions = results.get("versions") or {}
    if versions:
        lines += ["## Framework versions", "", *(f"- {k} {v}" for k, v in versions.items() if v), ""]
    return "\n".join(lines)


def write_model_card(best_dir: str | Path, results: dict, config: RunConfig) -> Path:
    """Writes `<best_dir>/README.md`; returns its path."""
    path = Path(best_dir) / "README.md"
    write_text_atomic(path, render_model_card(results, config, export_problems(best_dir)))
    return path


def export_problems(best_dir: str | Path) -> list[str]:
    """Why `scripts/export.py` would refuse the model in `best_dir` (its window, its vocabulary); empty if none."""
    try:
        return faster_whisper_problems(read_source_model(best_dir))
    except ExportError as error:
        return [str(error)]


def upload_files(best_dir: str | Path) -> list[str]:
    """The files `push_to_hub` uploads: everything in the folder, as relative POSIX paths."""
    folder = Path(best_dir)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_to_hub(best_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> list[str]:
    """Creates the model repository if needed and uploads `best_dir` to it in one commit; returns the uploaded
    files. Any failure (no token, no network, HF_HUB_OFFLINE, no permission) becomes a HubUploadError (a
    RuntimeError) naming the repository."""
    from huggingface_hub import HfApi

    folder = Path(best_dir)
    if not folder.is_dir():
        raise HubUploadError(f"cannot push {folder} to {repo_id}: no such folder")
    files = upload_files(folder)
    if "README.md" not in files:
        raise HubUploadError(f"cannot push {folder} to {repo_id}: it has no README.md (write_model_card first)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload model trained with whisper-loop")
    except Exception as error:  # HfHubHTTPError, OfflineModeIsEnabled, connection errors, ...
        raise HubUploadError(
            f"could not push {folder} to the Hub repository {repo_id!r}: {error} "
            "(log in with `hf auth login` or set HF_TOKEN, check the network, and unset HF_HUB_OFFLINE)"
        ) from error
    return files
