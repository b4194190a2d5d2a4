"""Generation-based evaluation, shared by the training loop, `scripts/evaluate.py` and the demo.

All three decode through `transcribe`, which takes language, task, length and beams from the model's own
generation config (saved in every model folder), so one checkpoint gives the same hypotheses on every path.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from loop.decoding_options import generation_options, temperature_fallback
from loop.encoder_window import batch_features, generation_inputs
from loop.hallucination import hallucination_metrics
from loop.language_id import detect_language_ids, language_code_of, language_id_share
from loop.loss import IGNORE_INDEX, token_losses
from loop.metrics import compute_metrics
from loop.sharding import full_parameters, generation_kwargs


@torch.no_grad()
def transcribe(model, input_features: torch.Tensor, tokenizer) -> list[str]:
    """(batch, n_mels, n_frames) features -> one transcript per row, decoded as the model folder says."""
    token_ids = decode_ids(model, input_features, tokenizer)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


@torch.no_grad()
def decode_ids(model, input_features: torch.Tensor, tokenizer, encoder_outputs=None, cross_attention=None,
               language: str | None = None, seconds: torch.Tensor | None = None, **engine_kwargs) -> torch.Tensor:
    """`generate_ids`, then the temperature fallback of `loop.decoding_options` for the rows whose text loops,
    when the model folder turns it on."""
    token_ids = generate_ids(model, input_features, encoder_outputs, cross_attention, language, seconds,
                             **engine_kwargs)
    if not getattr(model.generation_config, "temperature_fallback", False):
        return token_ids

    def sample(rows: torch.Tensor, temperature: float) -> torch.Tensor:
        outputs = None if encoder_outputs is None else BaseModelOutput(last_hidden_state=encoder_outputs[0][rows])
        return generate_ids(model, input_features[rows], outputs, None, language,
                            None if seconds is None else seconds[rows], do_sample=True, temperature=temperature,
                            **engine_kwargs)

    return temperature_fallback(token_ids, lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
                                sample, model.generation_config)


@torch.no_grad()
def generate_ids(model, input_features: torch.Tensor, encoder_outputs=None, cross_attention=None,
                 language: str | None = None, seconds: torch.Tensor | None = None, **engine_kwargs) -> torch.Tensor:
    """Generated token ids (batch, length); language and task are passed explicitly as the Whisper API requires,
    everything else (max_length, num_beams) comes from `model.generation_config`; `language` overrides the
    config's (a guard set in another language); `seconds` (batch,) of audio feed the duration cap
    (`loop.decoding_options`) when the config turns it on. With `encoder_outputs` (the encoder's output for
    `input_features`, already computed) the encoder is not run again; with `cross_attention` (a cache filled by a
    decoder pass over the same encoder output) neither are the decoder's projections of it. `engine_kwargs`:
    `loop.sharding.generation_kwargs` (synced_gpus under ZeRO-3), and the temperature fallback's `do_sample` and
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


@dataclass
class EvalResult:
    """Metrics in percent (`wer`, `cer`, `normalized_wer`, `normalized_cer`, the hallucination figures of
    `loop.hallucination`, `language_id`), `loss`, and one prediction per utterance as `{"index", "reference",
    "hypothesis", "detected_language"}`, ordered by index."""

    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()  # without it the loss pass records a graph, and loss_sums would keep every batch's graph alive
def evaluate(model, dataloader, accelerator, tokenizer, references: list[str], language: str, *, log_mel,
             compute_loss: bool = True, description: str = "eval", decode_language: str | None = None,
             language_id: bool = True) -> EvalResult:
    """Decodes every utterance of `dataloader` once across all processes and scores it against `references`
    (indexed by the rows' `index`). `log_mel` (`loop.features.LogMel` of the model's feature extractor, on the
    accelerator) turns each batch's audio into features. `language` names the references' language (their
    normalization and language ID); decoding is forced to `decode_language`, else to the model folder's language.
    With `language_id`, Whisper's own language detection runs on the same encoder output (one decoder step).
    Every process returns the same result. A model sharded with FSDP2 is gathered whole for the evaluation, and
    ZeRO-3 generates in lockstep (`loop.sharding`)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    with full_parameters(model):
        result = _evaluate(model, dataloader, accelerator, tokenizer, references, language, log_mel=log_mel,
                           compute_loss=compute_loss, description=description, decode_language=decode_language,
                           language_id=language_id)
    if was_training:
        model.train()
    result.seconds = time.perf_counter() - started
    return result


def _evaluate(model, dataloader, accelerator, tokenizer, references: list[str], language: str, *, log_mel,
              compute_loss: bool, description: str, decode_language: str | None, language_id: bool) -> EvalResult:
    generator = accelerator.unwrap_model(model)
    engine_kwargs = generation_kwargs(accelerator)
    pad_id = generator.generation_config.pad_token_id
    indices, hypothesis_ids, failed, loss_sums, token_counts, detected = [], [], [], [], [], []
    language_ids = language_id and bool(getattr(generator.generation_config, "lang_to_id", None))
    for number, batch in enumerate(tqdm(dataloader, desc=description, disable=not accelerator.is_main_process, leave=False)):
        rows = len(batch["index"])
        try:
            with accelerator.autocast():
                # One encoder pass serves both the loss and generation, and so do the decoder's cross-attention
                # keys and values of it, which the loss pass leaves in `cache`.
                features = batch_features(generator, log_mel, batch["audio"])
                encoder_outputs = generator.get_encoder()(features)
                loss_sum, tokens, cross_attention = None, None, None
                if compute_loss:
                    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                    loss_sum, tokens = _per_row_loss(generator, batch, encoder_outputs, cache)
                    cross_attention = cache.cross_attention_cache
                token_ids = decode_ids(generator, features, tokenizer, encoder_outputs, cross_attention,
                                       decode_language, batch["durations"], **engine_kwargs)
                languages = detect_language_ids(generator, encoder_outputs) if language_ids else None
            batch_failed = torch.zeros(rows, dtype=torch.bool, device=batch["index"].device)
        except (RuntimeError, ValueError, IndexError) as error:
            if "out of memory" in str(error).lower():
                raise
            # One bad batch costs its own rows, not the evaluation (nor, in the loop, the training run). The
            # collectives below still run, so the other processes do not wait forever.
            print(f"{description}: batch {number} failed and its {rows} utterances are left out: {error!r}", flush=True)
            device = batch["index"].device
            token_ids = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)
            loss_sum, tokens = torch.zeros(rows, device=device), torch.zeros(rows, dtype=torch.long, device=device)
            languages = torch.full((rows,), -1, dtype=torch.long, device=device)
            batch_failed = torch.ones(rows, dtype=torch.bool, device=device)
        # Rows of one batch are decoded to different lengths on each process; pad before gathering.
        token_ids = accelerator.pad_across_processes(token_ids.contiguous(), dim=1, pad_index=pad_id)
        if languages is None:
            languages = torch.full((rows,), -1, dtype=torch.long, device=batch["index"].device)
        gathered = accelerator.gather_for_metrics(
            (batch["index"], token_ids, batch_failed, languages, loss_sum, tokens) if compute_loss
            else (batch["index"], token_ids, batch_failed, languages)
        )
        indices += gathered[0].tolist()
        hypothesis_ids += gathered[1].cpu().tolist()
        failed += gathered[2].tolist()
        detected += gathered[3].tolist()
        if compute_loss:
            loss_sums.append(gathered[4].float().sum())
            token_counts.append(gathered[5].sum())
    hypotheses = [text.strip() for text in tokenizer.batch_decode(hypothesis_ids, skip_special_tokens=True)]
    id_to_code = {token_id: token.strip("<|>") for token, token_id in
                  (getattr(generator.generation_config, "lang_to_id", None) or {}).items()}
    predictions = sorted(
        ({"index": i, "reference": references[i], "hypothesis": h, "detected_language": id_to_code.get(lang, "")}
         for i, h, bad, lang in zip(indices, hypotheses, failed, detected) if not bad),
        key=lambda p: p["index"],
    )
    scored_references, scored_hypotheses = [p["reference"] for p in predictions], [p["hypothesis"] for p in predictions]
    metrics = compute_metrics(scored_references, scored_hypotheses, language)
    metrics.update(hallucination_metrics(scored_references, scored_hypotheses))
    if language_ids:
        metrics["language_id"] = language_id_share([p["detected_language"] for p in predictions],
                                                   language_code_of(language))
    if compute_loss:
        metrics["loss"] = (torch.stack(loss_sums).sum() / torch.stack(token_counts).sum().clamp(min=1)).item()
    metrics["num_utterances"] = len(predictions)
    metrics["num_failed"] = sum(failed)
    return EvalResult(metrics, predictions)


def _per_row_loss(model, batch, encoder_outputs, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and target-token count per row, so the loss over a split is exact however the
    rows are batched and spread over processes."""
    losses = token_losses(model, batch, encoder_outputs, cache)
    return losses.sum(dim=1), batch["labels"].ne(IGNORE_INDEX).sum(dim=1)
