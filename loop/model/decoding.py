"""How a model decodes: every path (the loop's evaluation, `scripts/evaluate.py`, the demo, the parity check)
goes through `transcribe` or `decode_ids`, which take language, task, length and beams from the model's own
generation config (saved in every model folder), so one checkpoint gives the same hypotheses on every path.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from loop.model.decoding_options import generation_options, temperature_fallback
from loop.model.encoder_window import generation_inputs
from loop.model.sharding import any_process
from loop.model.speculative import (
    DraftCounts,
    greedy_rules,
    prompt_ids,
    same_encoder_weights,
    speculative_row,
    unsupported_settings,
)


@torch.no_grad()
def transcribe(model, input_features: torch.Tensor, tokenizer, assistant_model=None) -> list[str]:
    """(batch, n_mels, n_frames) features -> one transcript per row, decoded as the model folder says (with
    `assistant_model`, by speculative decoding: `assisted_ids`)."""
    token_ids = decode_ids(model, input_features, tokenizer, assistant_model=assistant_model)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


@torch.no_grad()
def decode_ids(model, input_features: torch.Tensor, tokenizer, encoder_outputs=None, cross_attention=None,
               language: str | None = None, seconds: torch.Tensor | None = None, assistant_model=None,
               **engine_kwargs) -> torch.Tensor:
    """`generate_ids` (or `assisted_ids` with an `assistant_model`), then the temperature fallback of
    `loop.model.decoding_options` for the rows whose text loops, when the model folder turns it on."""
    if assistant_model is not None:
        token_ids = assisted_ids(model, assistant_model, input_features, encoder_outputs, language, seconds,
                                 **engine_kwargs)
    else:
        token_ids = generate_ids(model, input_features, encoder_outputs, cross_attention, language, seconds,
                                 **engine_kwargs)
    if not getattr(model.generation_config, "temperature_fallback", False):
        return token_ids

    def sample(rows: torch.Tensor, temperature: float) -> torch.Tensor:
        outputs = None if encoder_outputs is None else BaseModelOutput(last_hidden_state=encoder_outputs[0][rows])
        return generate_ids(model, input_features[rows], outputs, None, language,
                            None if seconds is None else seconds[rows], do_sample=True, temperature=temperature,
                            **engine_kwargs)

    agree = (lambda flag: any_process(flag, token_ids.device)) if engine_kwargs.get("synced_gpus") else bool
    return temperature_fallback(token_ids, lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
                                sample, model.generation_config, agree)


@torch.no_grad()
def generate_ids(model, input_features: torch.Tensor, encoder_outputs=None, cross_attention=None,
                 language: str | None = None, seconds: torch.Tensor | None = None, **engine_kwargs) -> torch.Tensor:
    """Generated token ids (batch, length); language and task are passed explicitly as the Whisper API requires,
    everything else (max_length, num_beams) comes from `model.generation_config`; `language` overrides the
    config's (a guard set in another language); `seconds` (batch,) of audio feed the duration cap
    (`loop.model.decoding_options`) when the config turns it on. With `encoder_outputs` (the encoder's output for
    `input_features`, already computed) the encoder is not run again; with `cross_attention` (a cache filled by a
    decoder pass over the same encoder output) neither are the decoder's projections of it. `engine_kwargs`:
    `loop.model.sharding.generation_kwargs` (synced_gpus under ZeRO-3), and the temperature fallback's `do_sample` and
    `temperature`."""
    settings = model.generation_config
    # A copy: for beam search generate repeats the encoder output's rows in place, in the object it is given.
    inputs = (generation_inputs(model, input_features) if encoder_outputs is None
              else {"encoder_outputs": copy.copy(encoder_outputs)})
    if cross_attention is not None and shares_cross_attention(settings):
        inputs["cache"] = EncoderDecoderCache(DynamicCache(), cross_attention)
    # One decoding pass per row: the input is one window. Without it, a row whose output ends on a timestamp token
    # before the window's end sends generate back for a second pass over the rest of the window, which with
    # `encoder_outputs` (no features to cut the batch by) fails inside transformers.
    token_ids = model.generate(**inputs, language=language or settings.language, task=settings.task, use_cache=True,
                               force_unique_generate_call=True, **generation_options(settings, seconds),
                               **engine_kwargs)
    return without_prompt(token_ids, settings)


@torch.no_grad()
def assisted_ids(model, assistant_model, input_features: torch.Tensor, encoder_outputs=None,
                 language: str | None = None, seconds: torch.Tensor | None = None, counts: DraftCounts | None = None,
                 **engine_kwargs) -> torch.Tensor:
    """`generate_ids`' greedy hypotheses, decoded with speculative decoding (`loop.model.speculative`):
    `assistant_model` (a smaller Whisper with the same tokenizer, e.g. a distilled student) drafts tokens, `model`
    checks them all in one forward pass and keeps those it would have chosen itself, so the output is `model`'s own
    greedy output, only sooner. Rows are decoded one by one and padded to one tensor. `model` uses
    `encoder_outputs` when given; an assistant with `model`'s encoder weights (a student made with the encoder
    copied whole) takes `model`'s encoder output, any other encodes the features itself. `counts` (optional)
    gathers the passes and accepted drafts."""
    settings = model.generation_config
    if (settings.num_beams or 1) > 1:
        raise ValueError(f"eval.assistant_model decodes greedily: the model's generation config asks for "
                         f"{settings.num_beams} beams (set --eval.generation_num_beams=1 or --num_beams 1)")
    unsupported = unsupported_settings(settings)
    if unsupported:
        raise ValueError("eval.assistant_model reproduces plain greedy decoding, but the model's generation config "
                         f"sets {', '.join(unsupported)}, which speculative decoding does not apply: remove it")
    if engine_kwargs.get("synced_gpus"):
        raise ValueError("eval.assistant_model decodes each row with its own number of passes, which ZeRO-3's "
                         "synced generation cannot follow: evaluate without the assistant, or without ZeRO-3")
    encoded = (model.get_encoder()(input_features) if encoder_outputs is None else encoder_outputs)[0]
    assistant_encoded = (encoded if same_encoder_weights(model, assistant_model)
                         else assistant_model.get_encoder()(input_features)[0])
    prompt = prompt_ids(settings, language or settings.language)
    rows = []
    for row in range(input_features.shape[0]):
        rules = greedy_rules(settings, len(prompt), None if seconds is None else float(seconds[row]),
                             model.config.max_target_positions)
        rows.append(speculative_row(model, assistant_model, encoded[row:row + 1], assistant_encoded[row:row + 1],
                                    prompt, rules, counts))
    width = max((len(ids) for ids in rows), default=0)
    padded = torch.full((len(rows), width), settings.pad_token_id, dtype=torch.long, device=input_features.device)
    for row, ids in enumerate(rows):
        padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


def without_prompt(token_ids: torch.Tensor, settings) -> torch.Tensor:
    """The generated ids without the decoder prompt (start, language, task, no-timestamps tokens), which
    `generate` returns at the front when it makes one call only; as it returns them otherwise."""
    if token_ids.shape[1] == 0 or not bool((token_ids[:, 0] == settings.decoder_start_token_id).all()):
        return token_ids
    prompt = {settings.decoder_start_token_id, getattr(settings, "no_timestamps_token_id", None),
              *(getattr(settings, "lang_to_id", None) or {}).values(),
              *(getattr(settings, "task_to_id", None) or {}).values()}
    length = 0
    while length < token_ids.shape[1] and all(token in prompt for token in token_ids[:, length].tolist()):
        length += 1
    return token_ids[:, length:]


def shares_cross_attention(settings) -> bool:
    """Whether generation can start from cross-attention keys and values computed for the batch as it is: not
    with beams (generate repeats every row per beam) nor with a cache type of the generation config's choosing."""
    return (settings.num_beams or 1) == 1 and not getattr(settings, "cache_implementation", None)
