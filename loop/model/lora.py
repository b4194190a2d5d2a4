"""LoRA adapters (peft) on a frozen Whisper, optionally over an 8-bit or 4-bit base (QLoRA), driven by the loop.

`apply_lora` wraps the model in a `peft.PeftModel`; the rest of the loop keeps calling it as a Whisper (`generate`,
`get_encoder`, `config` reach the Whisper through peft's attribute forwarding). Three things differ:

- checkpoints hold the adapter, not the frozen base (`save_adapter` / `load_adapter`, called from the
  `save_state` / `load_state` hooks in `loop.run.checkpoints`): the base is read again from `model.name_or_path`;
- `best/` is the merged model (`merged_copy`), an ordinary Whisper folder, with the adapter alone in `best/adapter/`;
- the options are checked together (`lora_problems`), CUDA included where bitsandbytes needs it.

The defaults (`loop.config.ModelConfig.lora_*`): rank 32, alpha 64, dropout 0.05 are the PEFT Whisper notebook's
values (alpha / rank = 2 scales the update as it does). The adapters go on every attention projection, q, k, v
and out, of the encoder's self-attention and the decoder's self- and cross-attention: the LoRA paper (Hu et al.
2021, section 7.1) found adapting several weight types at a lower rank better than one type at a higher rank, and a
new language changes both what the encoder hears and what the decoder writes, so both sides get adapters. On
whisper-small that is 7.1 M trainable parameters (2.9 %). Adding `fc1`/`fc2` takes it to 13.0 M; QLoRA's authors
adapt every linear layer to match full fine-tuning, so add them when the rank alone does not close the gap.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from loop.config.checks import bitsandbytes_problem

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names, so a checkpoint folder is an adapter folder too
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"


def target_pattern(modules: list[str], layers: str) -> str:
    """The regular expression peft fully matches against module names (`model.decoder.layers.3.encoder_attn.q_proj`)
    to place adapters: the named linear layers of the encoder's and/or the decoder's transformer layers."""
    sides = {"encoder_and_decoder": "encoder|decoder", "encoder": "encoder", "decoder": "decoder"}[layers]
    names = "|".join(re.escape(m) for m in modules)
    return rf"model\.({sides})\.layers\.\d+\.(\w+\.)?({names})"


def adapted_layers(config) -> str:
    """`model.lora_layers`, less the encoder when `model.freeze_encoder` asks for it untouched."""
    if config.freeze_encoder and config.lora_layers == "encoder_and_decoder":
        return "decoder"
    return config.lora_layers


def lora_config(config):
    """The peft `LoraConfig` of a `ModelConfig`."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_pattern(config.lora_target_modules, adapted_layers(config)), bias="none")


def quantized_loading(config) -> dict:
    """Extra `from_pretrained` arguments for `model.quantization`: a bitsandbytes config and this process' GPU
    (bitsandbytes quantizes as the weights reach the GPU). 4-bit is QLoRA's: NF4 with double quantization, matmuls
    in bf16 where the GPU has it, else fp16."""
    if config.quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    check_cuda_for("model.quantization", config.quantization)
    if config.quantization == "8bit":
        settings = BitsAndBytesConfig(load_in_8bit=True)
    else:
        settings = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
    return {"quantization_config": settings, "device_map": {"": torch.cuda.current_device()}}


def apply_lora(model, config):
    """`model` wrapped with LoRA adapters as `config` (a `ModelConfig`) says; every base weight frozen. A quantized
    base is prepared by peft first (layer norms in fp32, base frozen). Gradient checkpointing needs no input that
    requires grad here: the loop checkpoints with `use_reentrant=False`, which computes the adapters' gradients
    without it (reentrant checkpointing would need `enable_input_require_grads`)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, lora_config(config))


def is_lora_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_quantized(model) -> bool:
    base = model.get_base_model() if is_lora_model(model) else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"


def save_adapter(model, folder: str | Path) -> None:
    """The adapter's weights and config as peft writes them (`PeftModel.from_pretrained(base, folder)` reads them),
    without the model card `PeftModel.save_pretrained` adds."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in get_peft_model_state_dict(model).items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(folder))


def load_adapter(model, folder: str | Path) -> None:
    """Loads `save_adapter`'s weights into `model`'s adapter, in place; every adapter weight must be in the file."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint holds no LoRA adapter (was it saved without model.lora? then resume "
            "without it)"
        )
    weights = load_file(str(path))
    expected = set(get_peft_model_state_dict(model))
    if set(weights) != expected:
        raise ValueError(
            f"{path} does not fit this model's adapter: {len(set(weights) - expected)} unknown and "
            f"{len(expected - set(weights))} missing tensors (model.lora_* changed since it was saved?)"
        )
    set_peft_model_state_dict(model, weights)


def merged_copy(model):
    """A plain Whisper holding base + adapters merged, for `best/`; the training model is left as it is.

    A quantized base is dequantized before the merge: merging into the 8-/4-bit layers would quantize the merged
    weights again, and the rounding would wipe out most of the small adapter update. The adapter was trained over
    the dequantized base, so this is the model that was trained, in its float dtype."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if not is_quantized(model):
        return copy.deepcopy(model).merge_and_unload()
    adapter = get_peft_model_state_dict(model)
    base = copy.deepcopy(model).unload().dequantize().to(torch.float32)
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    merged = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(merged, adapter)
    return merged.merge_and_unload()


def check_cuda_for(option: str, value: str) -> None:
    """Raises `RuntimeError` when bitsandbytes cannot run `option=value` here (see `bitsandbytes_problem`)."""
    problem = bitsandbytes_problem(option, value)
    if problem:
        raise RuntimeError(problem)
