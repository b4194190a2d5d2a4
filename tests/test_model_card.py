"""The model card of best/ (metadata block, results, hyperparameters, usage) and the Hub upload, up to the network:
HfApi is replaced by a recorder, and without it HF_HUB_OFFLINE gives a clear error."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import yaml

from loop.config.loading import load_config
from loop.data.audio import decode_audio
from loop.ship.model_card import dataset_id, push_to_hub, write_model_card
from tests.helpers import child_env, corpus_rows

RESULTS = {  # what loop.train.finish() writes to results.json
    "initial_wer": 187.5, "best_wer": 35.123, "best_step": 3000, "final_wer": 35.9, "test_wer": 32.0456,
    "test_cer": 15.25, "test_normalized_wer": 30.5, "test_normalized_cer": 14.75, "test_utterances": 2894,
    "test_split": "test", "selection_split": "dev_slice (300 utterances, speaker-disjoint from training)",
    "selection_leaks_test": False, "steps": 4000, "effective_batch_size": 16, "num_processes": 1,
    "mixed_precision": "fp16", "seed": 42, "model": "openai/whisper-small",
    "versions": {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0"},
}
TOKEN = "hf_NotARealTokenButLooksLikeOne123"


@pytest.fixture
def best_dir(decoding_checkpoint, tmp_path):
    """A copy of a saved model folder as the loop writes best/ (model, generation config, processor files)."""
    return shutil.copytree(decoding_checkpoint, tmp_path / "best")


@pytest.fixture
def recipe_config(tmp_path):
    release = tmp_path / "cv-corpus-17.0-2024-03-15" / "hi"
    release.mkdir(parents=True)
    return load_config("whisper-small-hi", [f"--data.path={release}", "--train.hub_model_id=me/whisper-small-hi"],
                       str(tmp_path / "run"))


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_has_hub_metadata_results_and_hyperparameters(best_dir, recipe_config, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    text = write_model_card(best_dir, RESULTS, recipe_config).read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["language"] == ["hi"] and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "openai/whisper-small"
    assert meta["datasets"] == ["mozilla-foundation/common_voice_17_0"]
    assert meta["tags"] == ["automatic-speech-recognition", "whisper", "whisper-loop", "hf-asr-leaderboard"]
    assert meta["metrics"] == ["wer", "cer"]
    entry = meta["model-index"][0]
    assert entry["name"] == "whisper-small-hi"
    result = entry["results"][0]
    assert result["task"]["type"] == "automatic-speech-recognition"
    assert result["dataset"]["type"] == "mozilla-foundation/common_voice_17_0" and result["dataset"]["split"] == "test"
    assert result["dataset"]["name"] == "Common Voice 17.0 (Hindi)"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"wer": 32.05, "cer": 15.25}
    assert "| **test WER** | **32.05** |" in text and "| test CER, normalized | 14.75 |" in text
    assert "| best WER, on dev_slice (300 utterances, speaker-disjoint from training) (step 3000) | 35.12 |" in text
    assert "| learning_rate | 1e-05 |" in text and "| effective batch size | 16 |" in text
    assert "| warmup_steps | 500 |" in text and "| max_steps | 4000 |" in text and "| mixed_precision | fp16 |" in text
    assert "| seed | 42 |" in text and "| gradient_accumulation_steps | 2 |" in text
    assert "\n# me/whisper-small-hi\n" in text  # the title is the repository users load
    assert 'pipeline("automatic-speech-recognition", model="me/whisper-small-hi")' in text
    assert "scripts/evaluate.py --model me/whisper-small-hi" in text
    assert "never used for selection" in text and "also used for model selection" not in text
    assert TOKEN not in text and "HF_TOKEN" not in text


def test_card_says_when_the_test_split_chose_the_model(best_dir, recipe_config):
    results = {**RESULTS, "selection_leaks_test": True,
               "selection_split": "test (recipe mode: test used for model selection)"}
    text = write_model_card(best_dir, results, recipe_config).read_text(encoding="utf-8")
    assert "**Note: the test split was also used for model selection**" in text
    assert "not a held-out estimate" in text


def how_to_use_snippet(card: str) -> str:
    return re.search(r"## How to use\n\n```python\n(.*?)```", card, re.DOTALL).group(1)


def test_card_snippet_runs_as_written(best_dir, tmp_path):
    """The card's "How to use", run as a user would (a fresh interpreter, offline, their own MP3): soundfile and
    soxr give the pipeline 16-kHz audio, and its transcript is `loop.eval.evaluation.transcribe`'s for that clip."""
    import torch

    from loop.model.decoding import transcribe
    from loop.model.loading import load_for_inference
    from tests.reference import log_mel_features

    config = load_config("quickstart", [], str(best_dir.parent))  # the card names best_dir, absolute
    snippet = how_to_use_snippet(write_model_card(best_dir, RESULTS, config).read_text(encoding="utf-8"))
    assert f'model="{best_dir}"' in snippet and "soxr.resample(audio, rate, 16000)" in snippet
    clip = corpus_rows("test")[0]["audio_path"]  # a 48-kHz MP3, as Common Voice ships them
    script = tmp_path / "how_to_use.py"
    script.write_text(snippet.replace("clip.mp3", clip), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env=child_env(HF_HUB_OFFLINE="1"), check=False)
    assert run.returncode == 0, run.stderr
    model, processor = load_for_inference(str(best_dir))
    features = log_mel_features([decode_audio(clip)], processor.feature_extractor)
    (expected,) = transcribe(model, torch.from_numpy(features), processor.tokenizer)
    assert expected and run.stdout.splitlines()[-1] == expected


@pytest.mark.parametrize("options", [["--train.hub_model_id=me/whisper-hi"],
                                     ["--train.push_to_hub=true", "--train.hub_model_id=me/whisper-hi"]])
def test_card_names_the_hub_repository(best_dir, tmp_path, options):
    config = load_config("quickstart", options, str(tmp_path / "quickstart"))
    text = write_model_card(best_dir, RESULTS, config).read_text(encoding="utf-8")
    assert "\n# me/whisper-hi\n" in text
    assert 'pipeline("automatic-speech-recognition", model="me/whisper-hi")' in how_to_use_snippet(text)
    assert str(tmp_path) not in text


def test_card_names_the_local_folder_without_a_repository(best_dir, tmp_path):
    config = load_config("quickstart", [], str(tmp_path / "quickstart"))
    text = write_model_card(best_dir, RESULTS, config).read_text(encoding="utf-8")
    assert "\n# quickstart\n" in text
    snippet = how_to_use_snippet(text)
    assert f'model="{tmp_path / "quickstart" / "best"}"' in snippet and "me/" not in text
    # The 5-s-window test model cannot run in faster-whisper: the card says why instead of giving commands.
    assert "This model does not run in faster-whisper as it is: its window is 5 s" in text
    assert "scripts/export.py" not in text


def test_card_of_a_local_run(best_dir, tmp_path):
    """A local starting model has no Hub base_model (the Hub would reject it); a local corpus keeps its own name."""
    config = load_config("quickstart", [], str(tmp_path / "quickstart"))
    results = {**RESULTS, "initial_wer": None, "mixed_precision": "no"}
    meta = front_matter(write_model_card(best_dir, results, config).read_text(encoding="utf-8"))
    assert "base_model" not in meta
    assert meta["datasets"] == ["cv-corpus-17.0-synthetic"]
    hub = load_config(None, ["--data.source=hub", "--data.dataset_name=google/fleurs", "--data.dataset_config=hi_in"])
    assert dataset_id(hub) == "google/fleurs"


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder holds."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        readme = (kwargs["folder_path"] and open(f"{kwargs['folder_path']}/README.md", encoding="utf-8").read())
        self.calls.append(("upload_folder", {**kwargs, "readme": readme, "token": self.token}))


def test_push_to_hub_uploads_the_card_and_model(best_dir, recipe_config, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    write_model_card(best_dir, RESULTS, recipe_config)
    files = push_to_hub(best_dir, "me/whisper-small-hi", token=TOKEN, private=True)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "README.md"} <= set(files)
    (create, create_args), (upload, upload_args) = RecordingHfApi.calls
    assert create == "create_repo" and create_args == {"repo_id": "me/whisper-small-hi", "repo_type": "model",
                                                       "private": True, "exist_ok": True}
    assert upload == "upload_folder" and upload_args["folder_path"] == str(best_dir)
    assert upload_args["repo_id"] == "me/whisper-small-hi" and upload_args["token"] == TOKEN
    meta = front_matter(upload_args["readme"])
    assert meta["model-index"][0]["results"][0]["metrics"][0] == {"type": "wer", "value": 32.05, "name": "WER"}
    assert "32.05" in upload_args["readme"] and TOKEN not in upload_args["readme"]


def test_push_to_hub_refuses_a_folder_without_card(best_dir):
    with pytest.raises(RuntimeError, match="no README.md"):
        push_to_hub(best_dir, "me/x")


def test_push_to_hub_offline_is_a_clear_error(best_dir, recipe_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    write_model_card(best_dir, RESULTS, recipe_config)
    with pytest.raises(RuntimeError, match=r"could not push .* to the Hub repository 'me/whisper-small-hi'") as caught:
        push_to_hub(best_dir, "me/whisper-small-hi")
    assert "HF_HUB_OFFLINE" in str(caught.value)
