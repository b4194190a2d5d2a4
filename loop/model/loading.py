"""Loading a Whisper checkpoint (Hub id or local folder) with its processor: configured for fine-tuning
(`load_model`) or as saved, for inference (`load_for_inference`)."""

from __future__ import annotations

from transformers import WhisperForConditionalGeneration, WhisperProcessor

from loop.config import EvalConfig, ModelConfig, resolve_path
from loop.languages import language_code
from loop.model.decoding_options import apply_decoding_options
from loop.model.encoder_window import allow_short_inputs, record_encoder_window, saved_encoder_window
from loop.model.lora import apply_lora, quantized_loading
from loop.model.token_layout import LayoutError, check_layout


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names it and says what to check."""


def model_location(name_or_path: str) -> str:
    path = resolve_path(name_or_path)
    return str(path) if path.exists() else name_or_path


def load_processor(name_or_path: str, language: str | None = None, task: str | None = None) -> WhisperProcessor:
    """The feature extractor and tokenizer; with `language`/`task` the tokenizer's label prefix is set to them."""
    location = model_location(name_or_path)
    try:
        processor = WhisperProcessor.from_pretrained(location)
    except Exception as error:  # OSError for a missing repo, connection errors offline, ...
        raise ModelLoadError(f"cannot load the processor of {name_or_path!r}: {error}") from error
    if language or task:
        processor.tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    return processor


def load_weights(name_or_path: str, attn_implementation: str = "sdpa", **config_overrides) -> WhisperForConditionalGeneration:
    """The one `from_pretrained` of a Whisper model: float32 weights (mixed precision comes from Accelerate),
    `config_overrides` applied to its config (dropout, SpecAugment) or passed to `from_pretrained` (a bitsandbytes
    `quantization_config` and `device_map`)."""
    try:
        return WhisperForConditionalGeneration.from_pretrained(
            model_location(name_or_path), attn_implementation=attn_implementation, dtype="float32", **config_overrides
        )
    except Exception as error:  # OSError for a missing repo, connection errors offline, a corrupt file, ...
        raise ModelLoadError(
            f"cannot load a Whisper model from {name_or_path!r}: {error} "
            "(check the path or Hub id, and your network or HF_HUB_OFFLINE)"
        ) from error


def load_model(config: ModelConfig, eval_config: EvalConfig | None = None) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Model in float32 (mixed precision comes from Accelerate) and processor, with the training options applied;
    with `config.lora` a `peft.PeftModel` around the Whisper (`loop.model.lora`), over an 8-/4-bit base with
    `config.quantization`."""
    model = load_weights(config.name_or_path, config.attn_implementation, dropout=config.dropout,
                         apply_spec_augment=config.apply_spec_augment, mask_time_prob=config.mask_time_prob,
                         mask_feature_prob=config.mask_feature_prob, **quantized_loading(config))
    processor = load_processor(config.name_or_path, config.language, config.task)
    set_generation_settings(model, config.language, config.task, eval_config)
    check_files_agree(config.name_or_path, model, processor)
    set_encoder_window(model, config.encoder_window, config.encoder_window_multiple_s)
    model.config.use_cache = False  # the cache only serves generation; training would keep it for nothing
    if config.freeze_encoder:
        model.freeze_encoder()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:  # last: peft wraps the configured model and freezes every base weight
        model = apply_lora(model, config)
    # from_pretrained hands the model back in eval mode: without this, dropout and SpecAugment never run.
    model.train()
    return model, processor


def set_generation_settings(model, language: str, task: str, eval_config: EvalConfig | None) -> None:
    """Language, task, length and beams live in the model's generation config, so they are saved with every model
    and the loop, `scripts/evaluate.py` and the demo decode the same way. `forced_decoder_ids` is the legacy route
    (gone in transformers 5): cleared so it cannot contradict language and task."""
    settings = model.generation_config
    if not hasattr(settings, "lang_to_id"):
        raise ModelLoadError(
            "the model's generation config has no lang_to_id: it is outdated or was built from a bare config; "
            "save one like a Hub checkpoint's (see loop.model.tiny.whisper_generation_config)"
        )
    settings.language = language_code(language)
    settings.task = task
    settings.forced_decoder_ids = None
    if eval_config is not None:
        settings.max_length = eval_config.generation_max_length
        settings.num_beams = eval_config.generation_num_beams
        apply_decoding_options(settings, eval_config)


def set_encoder_window(model, window: str, multiple_s: float) -> None:
    """The encoder window the model trains or decodes with, recorded in its config (`loop.model.encoder_window`); with
    `dynamic` its encoder takes features shorter than the full window."""
    if window == "dynamic":
        allow_short_inputs(model)
    record_encoder_window(model, window, multiple_s)


def load_for_inference(
    name_or_path: str,
    *,
    language: str | None = None,
    task: str | None = None,
    num_beams: int | None = None,
    max_length: int | None = None,
    encoder_window: str | None = None,
    fallback_language: str = "hindi",
    attn_implementation: str = "sdpa",
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """A saved model in eval mode, decoding as its folder says: the generation config saved with every model of
    the loop carries language, task, max_length and num_beams, its config the encoder window it was trained with.
    Arguments that are not None override those; a checkpoint that names no language (a Hub base model) gets
    `fallback_language`."""
    model = load_weights(name_or_path, attn_implementation)
    saved_window, multiple_s = saved_encoder_window(model)
    set_encoder_window(model, encoder_window or saved_window, multiple_s)
    settings = model.generation_config
    language = language or getattr(settings, "language", None) or fallback_language
    task = task or getattr(settings, "task", None) or "transcribe"
    set_generation_settings(model, language, task, None)
    if num_beams is not None:
        settings.num_beams = num_beams
    if max_length is not None:
        settings.max_length = max_length
    model.config.use_cache = True
    model.eval()
    processor = load_processor(name_or_path, language, task)
    check_files_agree(name_or_path, model, processor)
    return model, processor


def check_files_agree(name_or_path: str, model, processor) -> None:
    """The model's mel bins and special ids are its processor's (v2 and v3 checkpoints differ in both:
    `loop.model.token_layout`), and its tokenizer has the language asked for."""
    settings = model.generation_config
    try:
        check_layout(name_or_path, model, processor, settings.language, settings.task)
    except LayoutError as error:
        raise ModelLoadError(str(error)) from error


def load_companion(name_or_path: str, model, tokenizer, option: str, *, encoder_window: str = "full",
                   attn_implementation: str = "sdpa", device="cpu") -> WhisperForConditionalGeneration:
    """A second model working beside `model` on its inputs and tokens (a distillation teacher, an assistant for
    speculative decoding), loaded for inference on `device` with `encoder_window` (with `dynamic` its encoder takes
    `model`'s short windows). Raises ModelLoadError naming `option` unless the two share the tokenizer
    (`tokenizer`'s vocabulary), special ids, mel bins and window: the one's distributions must be over the other's
    tokens, for the same input."""
    companion, processor = load_for_inference(name_or_path, encoder_window=encoder_window,
                                              attn_implementation=attn_implementation)
    config = getattr(model, "module", model).config  # DistributedDataParallel keeps the model in .module
    keys = ("vocab_size", "num_mel_bins", "max_source_positions", "decoder_start_token_id", "pad_token_id",
            "eos_token_id")
    differing = [f"{key} {getattr(companion.config, key)} (the other model's: {getattr(config, key)})"
                 for key in keys if getattr(companion.config, key) != getattr(config, key)]
    if processor.tokenizer.get_vocab() != tokenizer.get_vocab():
        differing.append("tokenizer's vocabulary")
    if differing:
        raise ModelLoadError(
            f"{option} {name_or_path!r} cannot work with this model: its " + ", ".join(differing) + " differ. "
            "Make the smaller model from the larger one with scripts/make_student.py."
        )
    return companion.to(device)
