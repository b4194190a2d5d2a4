"""The encoder window: Whisper's full 30-s window of frames (`full`, the recipe's) or, per batch, the longest clip
rounded up to a multiple of `model.encoder_window_multiple_s` seconds (`dynamic`).

This is the one place where Whisper's encoder accepts fewer frames than its full window. transformers'
`WhisperEncoder.forward` refuses any input but `max_source_positions * 2` frames (3000) and adds every row of
`embed_positions` (conv1 keeps the frame count, conv2's stride 2 halves it: T frames become T/2 positions).
`allow_short_inputs` swaps the encoder's class for `ShortInputWhisperEncoder`, whose `forward` runs the same
layers over T/2 positions with the first T/2 position embeddings when T is shorter, and hands a full window to
the parent unchanged. Modules, parameters and their names stay as they are, so `save_pretrained` writes an
ordinary Whisper checkpoint and `from_pretrained` loads it back as the stock model.

Generation does not refuse short features, it undoes them: `WhisperGenerationMixin.generate` (transformers 5.24)
takes T <= the window as short-form transcription and then zero-pads `input_features` to the full window before
the encoder sees them (`_get_input_segment`, "pad to 3000 if necessary"): the full window, padded with zeros
rather than the log-mel of silence. Given `encoder_outputs` instead, it decodes from them as they are; so
`generation_inputs` encodes short features itself (the evaluation loop already passes `encoder_outputs`).

The window a model was trained with is saved in its config (`encoder_window`, `encoder_window_multiple_s`: extra
attributes that `PretrainedConfig` writes to config.json and reads back), so evaluation and the demo decode with it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs

WINDOWS = ("full", "dynamic")
DEFAULT_MULTIPLE_S = 1.0
CONV_STRIDE = 2  # conv1 has stride 1, conv2 stride 2: T frames -> T/2 encoder positions


class ShortInputWhisperEncoder(WhisperEncoder):
    """A `WhisperEncoder` that also takes (batch, n_mels, T) features for any even T below its full window of
    `max_source_positions * 2` frames, using the first T/2 position embeddings. A full window goes to
    `WhisperEncoder.forward` itself, so its outputs are the stock encoder's, bit for bit."""

    def forward(self, input_features: torch.Tensor, attention_mask=None, **kwargs) -> BaseModelOutput:
        if input_features.shape[-1] >= full_window_frames(self.config):  # a longer one: the parent's error
            return super().forward(input_features, attention_mask, **kwargs)
        return self._forward_short(input_features, **kwargs)

    @merge_with_config_defaults
    @capture_outputs
    def _forward_short(self, input_features: torch.Tensor, **kwargs) -> BaseModelOutput:
        """`WhisperEncoder.forward` (transformers 5.24) over T/2 positions; the same decorators, so
        `output_hidden_states` and `output_attentions` work. The attention mask is ignored there too."""
        frames = input_features.shape[-1]
        if frames < CONV_STRIDE or frames % CONV_STRIDE:
            raise ValueError(
                f"the encoder takes an even number of frames up to {full_window_frames(self.config)}, "
                f"but found {frames} (see loop.model.encoder_window.window_frames)"
            )
        inputs_embeds = nn.functional.gelu(self.conv1(input_features))
        inputs_embeds = nn.functional.gelu(self.conv2(inputs_embeds))
        inputs_embeds = inputs_embeds.permute(0, 2, 1)
        positions = torch.arange(frames // CONV_STRIDE, device=inputs_embeds.device)
        hidden_states = inputs_embeds + self.embed_positions(positions)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        for encoder_layer in self.layers:
            # LayerDrop, drawn from the global RNG as the parent does (https://huggingface.co/papers/1909.11556)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = encoder_layer(hidden_states, None, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden_states))


def allow_short_inputs(model) -> nn.Module:
    """Lets the Whisper encoder of `model` (a `WhisperForConditionalGeneration` or `WhisperModel`) take features
    shorter than its full window, in place; returns `model`. No weights are copied; calling it twice is harmless."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if not isinstance(encoder, WhisperEncoder):
        raise TypeError(f"expected a Whisper model, got {type(model).__name__} (encoder: {type(encoder).__name__})")
    encoder.__class__ = ShortInputWhisperEncoder
    # transformers finds which submodules' outputs `output_hidden_states`/`output_attentions` collect by the
    # model's class name, registered when a model is built; the swapped class registers the parent's.
    _CAN_RECORD_REGISTRY[encoder] = WhisperEncoder._can_record_outputs
    return model


def full_window_frames(model_or_config) -> int:
    """Frames of the model's full input window: `max_source_positions * 2` (3000 for 30 s at a 10-ms hop)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.max_source_positions * CONV_STRIDE


def window_frames(lengths_in_samples, hop_length: int, multiple_s: float, sampling_rate: int, full_frames: int) -> int:
    """Frames of a batch's dynamic window: its longest clip (in samples) rounded up to a multiple of `multiple_s`
    seconds (one multiple at least, for a batch of empty clips), in frames of `hop_length` samples, rounded up to
    an even count and at most `full_frames`. A window of n samples has n / hop_length frames, as the feature
    extractor's 480,000-sample window has 3,000 (it drops the STFT's extra last frame)."""
    longest = max((int(n) for n in lengths_in_samples), default=0)
    multiple = max(1, round(multiple_s * sampling_rate))  # in samples; round() absorbs 0.1 * 16000 = 1600.0000000002
    multiples = max(1, -(-longest // multiple))
    frames = -(-multiples * multiple // hop_length)
    return min(frames + frames % 2, full_frames)


def generation_inputs(model, input_features: torch.Tensor) -> dict:
    """Keyword arguments for `model.generate` with (batch, n_mels, T) features: T shorter than the full window goes
    in as the encoder's output (generate would zero-pad `input_features` to the full window, see the module
    docstring), a full window as `input_features`. Short features need `allow_short_inputs(model)` first."""
    if input_features.shape[-1] >= full_window_frames(model):
        return {"input_features": input_features}
    return {"encoder_outputs": model.get_encoder()(input_features)}


def record_encoder_window(model_or_config, window: str, multiple_s: float = DEFAULT_MULTIPLE_S) -> None:
    """Writes the window into the model's config, so that `save_pretrained` keeps it in config.json. `full` removes
    the attributes: the config stays a stock one, also for a model fine-tuned from a dynamic-window checkpoint."""
    if window not in WINDOWS:
        raise ValueError(f"encoder window {window!r} is not one of {', '.join(WINDOWS)}")
    config = getattr(model_or_config, "config", model_or_config)
    if window == "full":
        for name in ("encoder_window", "encoder_window_multiple_s"):
            if hasattr(config, name):
                delattr(config, name)
        return
    config.encoder_window = window
    config.encoder_window_multiple_s = float(multiple_s)


def saved_encoder_window(model_or_config) -> tuple[str, float]:
    """(window, multiple in seconds) a model's config records; ("full", 1.0) for a stock checkpoint."""
    config = getattr(model_or_config, "config", model_or_config)
    window = getattr(config, "encoder_window", "full")
    if window not in WINDOWS:
        raise ValueError(f"the model's config.json has encoder_window {window!r}; expected one of {', '.join(WINDOWS)}")
    return window, float(getattr(config, "encoder_window_multiple_s", DEFAULT_MULTIPLE_S))


def batch_features(model, log_mel, audio: torch.Tensor) -> torch.Tensor:
    """The log-mel features of a padded batch of audio (batch, samples) at the window the model's config records:
    the full window, or with `dynamic` the batch's longest clip rounded up to the recorded multiple. The batch's
    width is its longest clip (the collator pads to it), so no length is read back from the device. In the
    weights' dtype when they are half (`as_model_input`)."""
    config = getattr(model, "module", model).config  # DistributedDataParallel keeps the model in .module
    window, multiple_s = saved_encoder_window(config)
    if window != "dynamic":
        return as_model_input(model, log_mel(audio))
    frames = window_frames([audio.shape[1]], log_mel.hop_length, multiple_s, log_mel.sampling_rate,
                           full_window_frames(config))
    return as_model_input(model, log_mel(audio, n_frames=frames))


def as_model_input(model, features: torch.Tensor) -> torch.Tensor:
    """Float `features` in the dtype of the model's weights when they are half: a DeepSpeed engine's bf16/fp16
    weights, under which Accelerate runs no autocast (the Trainer casts inputs there for the same reason), or a
    model loaded in half precision. With float32 weights (autocast, FSDP2's mixed precision, which casts inputs
    itself) they stay float32."""
    inner = getattr(model, "module", model)  # DistributedDataParallel and DeepSpeed's engine keep it in .module
    dtype = inner.get_encoder().conv1.weight.dtype  # the first layer the features meet
    if dtype in (torch.float16, torch.bfloat16) and features.dtype != dtype:
        return features.to(dtype)
    return features


def compile_encoder(model, backend: str | object = "inductor") -> None:
    """Compiles the Whisper encoder of `model` in place with `torch.compile` (`train.torch_compile`): the module and
    its parameter names stay, so checkpoints and best/ load without compiling. Call it after the model is wrapped
    (DDP, FSDP2, DeepSpeed): compiling first would trace the unwrapped modules.

    Only the encoder: its input has the window's shape, while the decoder's length changes with every batch and
    every generated token. At the full window the shapes are fixed but for the batch size of a last batch, which
    torch's automatic dynamic shapes absorb after one recompile; at a dynamic window the time axis changes with every
    batch, so it is compiled with dynamic shapes from the start: one graph for every length (and one for the full
    window's branch), per train/eval mode, instead of one per length until automatic dynamic shapes take over."""
    config = getattr(model, "module", model).config
    window, _ = saved_encoder_window(config)
    encoder = getattr(model, "module", model).get_encoder()  # get_encoder: a LoRA model (peft) has no .model.encoder
    encoder.compile(backend=backend, dynamic=True if window == "dynamic" else None)
