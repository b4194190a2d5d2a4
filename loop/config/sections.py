"""Run configuration: what can be set, as typed dataclasses with a docstring under every field.

Field names follow `Seq2SeqTrainingArguments` wherever the reference recipe has a name for the setting, so its
users find their way. A field's allowed values are part of its type: `Literal[...]` for choices, `Annotated[...,
Range(...)]` for bounds; `loop.config.checks` checks them all generically, `loop.config.loading` reads presets and
the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from loop.config.types import AtLeastOne, BatchSize, MixedPrecision, NotNegative, Pattern, Probability, Range, Share

SourceKind = Literal["common_voice", "hub", "manifest", "shards"]


@dataclass
class SourceConfig:
    """Where utterances are read from: the fields the data section, every `data.mix` entry and every guard set
    share, so `loop.data.sources` reads any of them the same way."""

    source: SourceKind = "common_voice"
    """Where utterances come from: `common_voice` (an extracted release folder), `hub` (a Hugging Face dataset),
    `manifest` (CSV/TSV/JSONL files named `<split>.<ext>` in `path`) or `shards` (rows prepared once by
    `scripts/prepare_data.py --shards`, in a folder or at an fsspec URL: docs/data.md)."""
    path: str = ""
    """Common Voice: the `cv-corpus-*` root or its `<locale>/` folder. Manifest: the folder (or one file) of
    manifests. Shards: the folder or URL (`s3://`, `gs://`, `hf://`, `https://`) holding `train/`, `test/`, ..."""
    locale: str = ""
    """Common Voice locale folder to use when `path` is a release root holding several (empty: the language's
    code)."""
    dataset_name: str = ""
    """Hub dataset id for `source: hub`, e.g. `google/fleurs`."""
    dataset_config: str = ""
    """Hub dataset configuration, e.g. `hi_in`."""
    dataset_revision: str = ""
    """Hub dataset revision, e.g. `refs/convert/parquet`; empty for the default branch."""
    audio_column: str = "audio"
    """Audio column for hub and manifest sources (bytes, a path, or a datasets Audio column)."""
    text_column: str = "sentence"
    """Transcript column for hub and manifest sources (Common Voice always uses `sentence`)."""


def source_of(config: SourceConfig, **changes) -> SourceConfig:
    """The source fields of a data section, `data.mix` entry or guard set, alone (with `changes` applied)."""
    values = {name: getattr(config, name) for name in SourceConfig.__dataclass_fields__}
    return SourceConfig(**(values | changes))


@dataclass
class MixSource(SourceConfig):
    """One more source of training rows for `data.mix`: read like the data source (same fields), labelled with its
    own language, and drawn at its own share of every epoch (`loop.data.mixing`)."""

    name: str = ""
    """Short name, unique within `data.mix`: the source's key in data_report.json (`train.<name>`) and its cache."""
    weight: Annotated[float, Range(low=0, high=1, low_open=True, high_open=True)] = 0.1
    """Share of each epoch's training rows drawn from this source; the data source fills the rest (1 - the sum of
    the weights, which must stay above 0)."""
    train_splits: list[str] = field(default_factory=lambda: ["train", "dev"])
    """Splits whose rows this source contributes (all of them train: no selection slice is cut from them)."""
    language: str = ""
    """Language of this source's transcripts (a Whisper language name or code): its rows' label prefix carries this
    language's token (empty: `model.language`)."""
    max_samples: NotNegative = 0
    """Use at most this many of this source's utterances (0: all)."""


@dataclass
class DataConfig(SourceConfig):
    """The data source (its `SourceConfig` fields: `data.source`, `data.path`, ...) and how its rows are split,
    checked and prepared."""

    locale: str = "hi"
    """Common Voice locale folder to use when `path` is a release root holding several."""
    train_splits: list[str] = field(default_factory=lambda: ["train", "dev"])
    """Splits that form the training set (the recipe trains on train + validation)."""
    eval_split: str = "test"
    """The held-out split, evaluated once at the end on the selected model."""
    selection_size: NotNegative = 300
    """Utterances held out of the training splits, speaker-disjoint by `client_id`, to pick the best checkpoint."""
    max_train_samples: NotNegative = 0
    """Use at most this many training utterances (0: all); for quick experiments."""
    max_eval_samples: NotNegative = 0
    """Evaluate at most this many utterances of the selection slice and of the held-out split (0: all)."""
    max_duration_s: Annotated[float, Range(low=0, high=30, low_open=True)] = 30.0
    """Drop clips longer than this many seconds (never more than the model's input window)."""
    min_duration_s: Annotated[float, Range(low=0)] = 0.5
    """Clips shorter than this are implausible (a 300-byte MP3 decodes to 72 ms); Common Voice's recorder has never
    kept a take under 0.8 s. Training skips implausible rows, evaluation keeps and flags them. 0: no minimum."""
    min_chars_per_second: Annotated[float, Range(low=0)] = 0.5
    """Transcripts slower than this (characters, spaces included, per second of audio) are implausible: reading
    runs 8-20/s, silence around a one-word sentence takes a real row to about 1; 0.5 means text is missing. 0: off."""
    max_chars_per_second: Annotated[float, Range(low=0, low_open=True)] = 40.0
    """Transcripts faster than this are implausible (a cut clip, another row's text): twice the fast end of reading
    (20/s), and silence only lowers a row's rate."""
    pack_to_seconds: Annotated[float, Range(low=0, high=30)] = 0.0
    """Training rows only: join consecutive utterances into one row of at most this many seconds (30 fills
    Whisper's window, as distil-whisper trains), so a step sees several utterances per row; 0 keeps one utterance
    per row. Selection and test rows are never packed. Measured in docs/speed-and-memory.md."""
    timestamp_fraction: Share = 0.0
    """Training rows only: this share of rows (chosen by a hash of train.seed and the row, stored in the prepared
    cache) is labelled with timestamp tokens instead of `<|notimestamps|>`, one segment per utterance at its speech
    bounds, so the model keeps predicting timestamps (distil-whisper uses 0.2-0.5); 0: none.
    docs/timestamps-and-long-form.md."""
    num_proc: AtLeastOne = 1
    """Processes for data preparation (decoding, resampling, tokenizing) with `datasets.map`."""
    cache_dir: str = ""
    """Where prepared audio and labels are cached (empty: `~/.cache/whisper-loop`). A rerun with the same inputs
    reuses them."""
    strict: bool = False
    """Stop at the first bad row instead of skipping and counting it."""
    no_speech_fraction: Annotated[float, Range(low=0, high=1, high_open=True)] = 0.0
    """Share of the data source's training rows that are silence or noise with an empty transcript (the label
    prefix, then `<|endoftext|>`), teaching the model to say nothing when nothing is said (`loop.data.no_speech`;
    0: none). Seeded by `train.seed`, lengths drawn from the training rows'."""
    no_speech_dir: str = ""
    """Folder of noise clips (searched recursively) for the no-speech rows, each row an excerpt of random length;
    empty: generated digital silence and quiet white or pink noise."""
    streaming: bool = False
    """With `source: shards`: stream the training rows from the shards during training (no copy of the corpus on
    local disk; each process and DataLoader worker reads its own windows) instead of reading them all first."""
    shuffle_buffer: AtLeastOne = 256
    """Streaming: rows of the data source per window, the unit that is read, shuffled (or length-grouped) and
    batched; a window's audio is held in memory (about 1 MB per row of 30 s), one per DataLoader worker and one in
    use."""
    verify_shards: bool = True
    """Check each shard's SHA-256 against its index before reading it (one extra read of the file per reader);
    turn off for remote shards where that costs too much: sizes and Parquet's page checksums are still checked."""
    mix: list[MixSource] = field(default_factory=list)
    """More sources of training rows, each with its share of every epoch (YAML: a list of mappings with the
    `MixSource` fields; command line: a YAML flow list, `--data.mix='[{name: en, weight: 0.2, path: ...}]'`)."""


@dataclass
class ModelConfig:
    name_or_path: str = "openai/whisper-small"
    """Hub id or local `save_pretrained` folder of the Whisper checkpoint to fine-tune."""
    language: str = "hindi"
    """Language of the transcripts, as a Whisper language name or code."""
    task: Literal["transcribe", "translate"] = "transcribe"
    """`transcribe` or `translate`."""
    freeze_encoder: bool = False
    """Train the decoder only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    apply_spec_augment: bool = False
    """SpecAugment masking of the input features during training (Whisper config's own implementation)."""
    mask_time_prob: Probability = 0.05
    """SpecAugment: fraction of time steps masked (when `apply_spec_augment`)."""
    mask_feature_prob: Probability = 0.0
    """SpecAugment: fraction of mel bins masked (when `apply_spec_augment`)."""
    dropout: Probability = 0.0
    """Dropout probability in the transformer layers."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: `sdpa` (PyTorch scaled dot-product attention) or `eager`."""
    encoder_window: Literal["full", "dynamic"] = "full"
    """Frames the encoder sees: `full` (the recipe's 30-s window, every clip padded to it) or `dynamic` (per batch,
    the longest clip rounded up to `encoder_window_multiple_s`; saved in the model's config.json, so evaluation and
    the demo decode the same way)."""
    encoder_window_multiple_s: Annotated[float, Range(low=0, high=30, low_open=True)] = 1.0
    """With `encoder_window: dynamic`: the window is a multiple of this many seconds (fewer distinct shapes)."""
    lora: bool = False
    """Train LoRA adapters (peft) on a frozen base instead of every weight: `best/` is still the whole model (the
    adapters merged), `best/adapter/` the adapter alone, checkpoints hold the adapter (`loop/model/lora.py`)."""
    lora_rank: AtLeastOne = 32
    """LoRA rank r of each adapted matrix (the PEFT Whisper notebook's 32)."""
    lora_alpha: Annotated[float, Range(low=0, low_open=True)] = 64.0
    """LoRA scale numerator: the update is (alpha / rank) * B A; 64 with rank 32 doubles it, as the notebook does."""
    lora_dropout: Probability = 0.05
    """Dropout on the adapters' input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Linear layers that get adapters, of q_proj, k_proj, v_proj, out_proj (self- and cross-attention), fc1, fc2."""
    lora_layers: Literal["encoder_and_decoder", "encoder", "decoder"] = "encoder_and_decoder"
    """Where adapters go; `model.freeze_encoder` leaves the encoder without them."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """The frozen base under LoRA in 8-bit or 4-bit NF4 (QLoRA) by bitsandbytes; needs `model.lora` and CUDA."""


@dataclass
class TrainConfig:
    per_device_train_batch_size: BatchSize = 16
    """Utterances per process per micro-batch, or `auto`: before training, the largest that fits the GPU, less 10%
    (scripts/find_batch_size.py's search), with the `gradient_accumulation_steps` that keep `auto_effective_batch`
    per optimizer step; the choice is printed and kept by a resume. Needs a CUDA GPU and one process."""
    gradient_accumulation_steps: AtLeastOne = 1
    """Micro-batches per optimizer step."""
    auto_effective_batch: NotNegative = 0
    """With `per_device_train_batch_size: auto`: utterances per optimizer step and process to keep (0: the number
    `auto` replaced, from the preset or the defaults, times `gradient_accumulation_steps`); unused otherwise."""
    learning_rate: Annotated[float, Range(low=0, low_open=True)] = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: Annotated[float, Range(low=0)] = 0.0
    """AdamW weight decay."""
    warmup_steps: NotNegative = 500
    """Optimizer steps of linear warmup from 0 to `learning_rate` (longer than `max_steps`: the peak is never
    reached, and the run says so)."""
    max_steps: AtLeastOne = 4000
    """Optimizer steps in the whole run (then linear decay reaches 0)."""
    max_grad_norm: Annotated[float, Range(low=0)] = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    mixed_precision: MixedPrecision = "fp16"
    """`no`, `fp16` or `bf16`; Accelerate's config file value wins when it sets one. fp16/bf16 need a GPU."""
    logging_steps: AtLeastOne = 25
    """Optimizer steps between log lines (and between host-device syncs for the loss)."""
    save_steps: AtLeastOne = 1000
    """Optimizer steps between checkpoints."""
    save_total_limit: AtLeastOne = 2
    """Checkpoints kept (the best one is never deleted)."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """`adamw` (torch's fused AdamW) or `adamw_8bit` (bitsandbytes' AdamW8bit: moments in 8 bits, 6 bytes a
    parameter less; needs CUDA)."""
    deterministic: bool = False
    """Bitwise-reproducible runs: two identical runs, and a run killed and resumed, give the same weights
    (`torch.use_deterministic_algorithms`, and on CUDA `CUBLAS_WORKSPACE_CONFIG` and no cuDNN benchmark) on the
    same machine with the same thread count. On CPU it cost nothing measurable (quickstart, 2 threads: -5%, within
    the noise, `python -m benchmarks.determinism`); not measured on a GPU (docs/training.md, "Reproducible runs")."""
    group_by_length: bool = False
    """Batches of clips of similar duration (shuffled in groups of 50 batches, sorted, the batches shuffled): less
    padding, and a short window for every row with `model.encoder_window: dynamic`."""
    dataloader_num_workers: NotNegative = 0
    """DataLoader worker processes."""
    ddp_timeout_minutes: Annotated[float, Range(low=1)] = 60.0
    """Minutes a process waits in a collective (a barrier, an all-reduce) before the run fails; NCCL's own default,
    10, is shorter than preparing an uncached corpus or hashing a large checkpoint on the main process."""
    resume: Annotated[bool | str, Pattern(r"step_\d+", "true, false or step_N")] = False
    """`true`: continue from the newest checkpoint in `output_dir` that passes verification (its files' SHA-256);
    `step_N`: from `checkpoints/step_N`."""
    overwrite_output_dir: bool = False
    """Start afresh in an `output_dir` that holds another run's checkpoints."""
    allow_config_change: bool = False
    """On resume, accept changes to settings that make the resumed run differ from an uninterrupted one (batch,
    accumulation, seed, data, model); without it such a resume is refused and the changes are listed."""
    max_consecutive_nonfinite: AtLeastOne = 10
    """Stop (after saving) when this many optimizer steps in a row have a non-finite loss."""
    torch_compile: bool = False
    """Compile the encoder with `torch.compile`, after the model is wrapped (dynamic shapes with
    `model.encoder_window: dynamic`); the first steps and the first evaluation then take minutes."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, comma-separated, any of tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive,
    trackio, swanlab (Accelerate's), or `none`: each gets the same scalars, the config and the evaluation examples."""
    tracker_project: str = "whisper-loop"
    """Project (wandb, comet_ml, ...) or experiment (mlflow) name in the trackers; the run is named after
    `output_dir`'s folder."""
    ema_decay: Annotated[float, Range(low=0, high=1, high_open=True)] = 0.0
    """Keep an exponential moving average of the trainable weights with this decay (0: off; 0.999 weighs about the
    last 1,000 steps), saved in checkpoints; evaluation and `best/` then use the averaged weights."""
    ema_on_cpu: bool = False
    """Keep the `ema_decay` average in host memory instead of on the accelerator (for models that fill it)."""
    push_to_hub: bool = False
    """Upload `best/` to the Hub at the end."""
    hub_model_id: str = ""
    """Repository for `push_to_hub`, e.g. `me/whisper-small-hi`."""
    distill_from: str = ""
    """Teacher model (folder or Hub id) to distil from: the model trained here (the student, e.g. one made by
    scripts/make_student.py) learns from the labels and from the frozen teacher's token distributions
    (docs/distillation.md); empty: no teacher."""
    distill_alpha_ce: Annotated[float, Range(low=0)] = 0.8
    """With `distill_from`: weight of the cross-entropy on the labels (distil-whisper's 0.8)."""
    distill_alpha_kl: Annotated[float, Range(low=0)] = 1.0
    """With `distill_from`: weight of T^2 * KL(teacher || student) at `distill_temperature` (distil-whisper's 1)."""
    distill_temperature: Annotated[float, Range(low=0, low_open=True)] = 2.0
    """With `distill_from`: softmax temperature of both distributions in the KL term (distil-whisper's 2)."""


@dataclass
class GuardSet(SourceConfig):
    """An extra evaluation set, decoded at every evaluation beside the selection split (`eval.guard_sets`): what
    fine-tuning costs in another language or domain. Any source the data layer reads; its own language."""

    name: str = ""
    """Its name in logs, TensorBoard (`guard/<name>/wer`) and results.json."""
    language: str = ""
    """Language of its transcripts (Whisper name or code): decoding is forced to it and its WER normalized for it."""
    locale: str = ""
    """Common Voice locale folder under `path` (empty: `path` holds one)."""
    split: str = "test"
    """The split to evaluate."""
    max_samples: NotNegative = 50
    """Evaluate at most this many utterances (0: all): a guard set costs evaluation time at every evaluation."""


@dataclass
class EvalConfig:
    eval_steps: AtLeastOne = 1000
    """Optimizer steps between evaluations on the selection split (the last step always evaluates)."""
    per_device_eval_batch_size: AtLeastOne = 16
    """Utterances per process per generation batch."""
    generation_max_length: AtLeastOne = 225
    """Maximum decoded tokens, prompt included (the recipe's value)."""
    generation_num_beams: AtLeastOne = 1
    """1 for greedy decoding, more for beam search."""
    select_on: Literal["dev_slice", "test"] = "dev_slice"
    """`dev_slice` (honest: a speaker-disjoint slice of the training data) or `test` (the recipe's way, which leaks
    the test set into model selection; labelled as such in logs and results.json)."""
    eval_on_start: bool = True
    """Evaluate before the first step, giving `initial_wer`."""
    num_logged_examples: NotNegative = 5
    """Reference/prediction pairs logged to TensorBoard at each evaluation."""
    no_repeat_ngram_size: NotNegative = 0
    """Never repeat an n-gram of this many tokens within a hypothesis (0: off). Stops "और और और" loops, but also
    forbids real repeats: keep it at 3 or more for Devanagari, where one word is often several tokens."""
    max_new_tokens_per_second: Annotated[float, Range(low=0)] = 0.0
    """Stop a hypothesis at this many new tokens per second of its audio (at least 8; 0: off): a loop cannot run to
    generation_max_length. Read speech in Hindi takes about 4-8 Whisper tokens a second: 20 leaves room."""
    temperature_fallback: bool = False
    """Whisper's temperature fallback: a hypothesis whose text compresses beyond `compression_ratio_threshold` (it
    loops) is decoded again by sampling at 0.2, 0.4, ... 1.0 until one passes (the last is kept)."""
    compression_ratio_threshold: Annotated[float, Range(low=0, low_open=True)] = 2.4
    """For `temperature_fallback`: UTF-8 bytes over their zlib size, Whisper's 2.4 (the hallucination metrics use
    the same ratio). Devanagari compresses more than Latin script: long Hindi rows of 30 s may reach 2.4 unlooped."""
    guard_sets: list[GuardSet] = field(default_factory=list)
    """Extra evaluation sets (YAML: a list of mappings with `GuardSet`'s keys; command line: the same as a YAML flow
    list, `--eval.guard_sets='[{name: english, language: en, path: assets/cv-corpus-17.0-synthetic, locale: en}]'`),
    each scored at every evaluation with WER, hallucination figures and language ID."""
    language_id_drop_warning: Annotated[float, Range(low=0)] = 10.0
    """Warn when the share of utterances whose language Whisper detects as the set's own falls by more than this
    many points from step 0 (on the selection split and each guard set)."""
    assistant_model: str = ""
    """scripts/evaluate.py: a smaller model with the same tokenizer (e.g. a distilled student, folder or Hub id) that
    drafts tokens for speculative decoding: the evaluated model's own greedy output, sooner (docs/distillation.md);
    greedy only, one row at a time. Empty: plain decoding."""


@dataclass
class AugmentConfig:
    speed_perturbation: bool = False
    """Resample each training row at one of `speed_factors`, drawn uniformly (tempo and pitch change together,
    as sox's `speed`). A row that slowing would push past the model's window keeps its speed."""
    speed_factors: Annotated[list[float], Range(low=0.5, high=2)] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    """Speed factors for `speed_perturbation` (1.1: 10% faster and shorter); Kaldi's three by default."""
    noise_probability: Share = 0.0
    """Share of training rows that get additive noise (0: off)."""
    snr_db_low: float = 10.0
    """Lowest signal-to-noise ratio of the added noise, in dB of the row's own speech power."""
    snr_db_high: float = 30.0
    """Highest signal-to-noise ratio; each noised row draws its SNR uniformly between the two."""
    noise_dir: str = ""
    """Folder of noise clips (WAV, FLAC, OGG, Opus or MP3, searched recursively, resampled to 16 kHz), a random
    excerpt per noised row; empty: white Gaussian noise."""
    gain_probability: Share = 0.0
    """Share of training rows whose level is changed by a random gain (0: off)."""
    gain_db_low: float = -6.0
    """Lowest gain in dB."""
    gain_db_high: float = 6.0
    """Highest gain in dB; each row draws its gain uniformly between the two."""


@dataclass
class RunConfig:
    output_dir: str = "runs/whisper-small-hi"
    """Folder for checkpoints, TensorBoard logs, `best/` and `results.json`."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
            "augment": AugmentConfig}
