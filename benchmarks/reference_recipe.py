"""The reference: the Hugging Face blog's "Fine-Tune Whisper For Multilingual ASR with Transformers" recipe.

Its collator, `prepare_dataset`, WER `compute_metrics`, model set-up and `Seq2SeqTrainingArguments`, as the blog
has them (changes are marked "not in the blog"), and the feature extractor on its NumPy path, which is also the
reference that tests/test_features.py holds `loop.model.features` to. Ours is `loop/`; nothing in `loop/` imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from benchmarks.settings import LANGUAGE, TASK
from loop.data.audio import SAMPLE_RATE, decode_audio

if TYPE_CHECKING:
    import datasets

    from benchmarks.settings import BenchSettings


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """The blog's collator, as the blog has it: the reference, not ours (ours is loop.data.collator)."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features):
        # split inputs and labels since they have to be of different lengths and need different padding methods
        # first treat the audio inputs by simply returning torch tensors
        input_features = [{"input_features": feature["input_features"]} for feature in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")

        # get the tokenized label sequences
        label_features = [{"input_ids": feature["labels"]} for feature in features]
        # pad the labels to max length
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")

        # replace padding with -100 to ignore loss correctly
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)

        # if bos token is appended in previous tokenization step,
        # cut bos token here as it's append later anyways
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]

        batch["labels"] = labels

        return batch


class NumpyPathWhisperFeatureExtractor(WhisperFeatureExtractor):
    """The Whisper feature extractor on its NumPy STFT, one clip at a time, as it runs where torch is not
    installed: `__call__` takes `_torch_extract_fbank_features` whenever torch imports and no argument picks the
    NumPy method, so the torch one is pointed at it (a subclass of transformers' class, not a patch of it)."""

    def _torch_extract_fbank_features(self, waveform, device="cpu"):
        return self._np_extract_fbank_features(waveform, device)


def numpy_path_feature_extractor(feature_extractor: WhisperFeatureExtractor) -> NumpyPathWhisperFeatureExtractor:
    """A copy of `feature_extractor` (same settings) that takes the NumPy path."""
    return NumpyPathWhisperFeatureExtractor(**feature_extractor.to_dict())


def blog_prepare_dataset(batch, feature_extractor, tokenizer):
    """The blog's `prepare_dataset` (one example per call). The blog's `batch["audio"]` is decoded at 16 kHz by
    datasets' Audio column; here the same decoder as on our side reads the clip (FFmpeg, which the Audio column
    would use for MP3s, is not installed here)."""
    audio = decode_audio(batch["audio_path"])
    # compute log-Mel input features from input audio array
    batch["input_features"] = feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_features[0]
    # encode target text to label ids
    batch["labels"] = tokenizer(batch["sentence"]).input_ids
    return batch


def reference_prepare(rows: datasets.Dataset, feature_extractor, tokenizer, cache_file: Path,
                      num_proc: int) -> datasets.Dataset:
    """The blog's `common_voice.map(prepare_dataset, remove_columns=...)` over rows with the blog's columns
    (`audio_path`, `sentence`), written to `cache_file`."""
    return rows.map(
        blog_prepare_dataset,
        fn_kwargs={"feature_extractor": feature_extractor, "tokenizer": tokenizer},
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(cache_file),
        load_from_cache_file=False,
    )


def blog_compute_metrics(tokenizer):
    """The blog's WER `compute_metrics` (jiwer, which `evaluate.load("wer")` wraps)."""
    import jiwer

    def compute_metrics(pred):
        pred_ids = pred.predictions
        label_ids = pred.label_ids
        # replace -100 with the pad_token_id
        label_ids[label_ids == -100] = tokenizer.pad_token_id
        pred_ids[pred_ids == -100] = tokenizer.pad_token_id  # not in the blog: rows of unequal length are padded with -100
        # we do not want to group tokens when computing the metrics
        pred_str = tokenizer.batch_decode(pred_ids, skip_special_tokens=True)
        label_str = tokenizer.batch_decode(label_ids, skip_special_tokens=True)
        references = [r if r.strip() else "<empty>" for r in label_str]  # not in the blog: jiwer rejects empty ones
        return {"wer": 100 * jiwer.wer(references, pred_str)}

    return compute_metrics


def reference_model(model_dir: Path, attn_implementation: str) -> WhisperForConditionalGeneration:
    """The blog's model set-up: language and task in the generation config, no forced decoder ids."""
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, attn_implementation=attn_implementation)
    model.generation_config.language = LANGUAGE
    model.generation_config.task = TASK
    model.generation_config.forced_decoder_ids = None
    return model


def reference_arguments(settings: BenchSettings, output_dir: Path):
    """The blog's Seq2SeqTrainingArguments, with the benchmark's sizes and no evaluation, saving or logging."""
    # takes seconds to import; only the reference needs it
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate,
        warmup_steps=0,
        max_steps=settings.warmup_steps + settings.timed_steps,
        gradient_checkpointing=settings.gradient_checkpointing,
        fp16=settings.precision == "fp16",
        bf16=settings.precision == "bf16",
        eval_strategy="no",
        per_device_eval_batch_size=settings.reference_eval_batch_size,
        predict_with_generate=True,
        generation_max_length=settings.generation_max_length,
        save_strategy="no",
        logging_steps=10**9,
        report_to="none",
        dataloader_num_workers=settings.dataloader_num_workers,
        seed=settings.seed,
        disable_tqdm=True,
    )
