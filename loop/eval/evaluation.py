"""Generation-based evaluation, shared by the training loop, `scripts/evaluate.py` and the guard sets: hypotheses
decoded as the model folder says (`loop.model.decoding`), scored with WER, CER, hallucination figures, language ID
and the loss."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from loop.eval.hallucination import hallucination_metrics
from loop.eval.language_id import detect_language_ids, language_id_share
from loop.eval.metrics import compute_metrics
from loop.languages import language_code
from loop.model.decoding import decode_ids
from loop.model.encoder_window import batch_features
from loop.model.loss import IGNORE_INDEX, token_losses
from loop.model.sharding import full_parameters, generation_kwargs
from loop.model.speculative import DraftCounts


@dataclass
class EvalResult:
    """Metrics in percent (`wer`, `cer`, `normalized_wer`, `normalized_cer`, the hallucination figures of
    `loop.eval.hallucination`, `language_id`), `loss`, and one prediction per utterance as `{"index", "reference",
    "hypothesis", "detected_language"}`, ordered by index."""

    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()  # without it the loss pass records a graph, and loss_sums would keep every batch's graph alive
def evaluate(model, dataloader, accelerator, tokenizer, references: list[str], language: str, *, log_mel,
             compute_loss: bool = True, description: str = "eval", decode_language: str | None = None,
             language_id: bool = True, assistant_model=None) -> EvalResult:
    """Decodes every utterance of `dataloader` once across all processes and scores it against `references`
    (indexed by the rows' `index`). `log_mel` (`loop.model.features.LogMel` of the model's feature extractor, on the
    accelerator) turns each batch's audio into features. `language` names the references' language (their
    normalization and language ID); decoding is forced to `decode_language`, else to the model folder's language.
    With `language_id`, Whisper's own language detection runs on the same encoder output (one decoder step).
    With `assistant_model` (on the same device) hypotheses come from speculative decoding, the model's own greedy
    ones (`loop.model.decoding.assisted_ids`).
    Every process returns the same result. A model sharded with FSDP2 is gathered whole for the evaluation, and
    ZeRO-3 generates in lockstep (`loop.model.sharding`)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    with full_parameters(model):
        result = _evaluate(model, dataloader, accelerator, tokenizer, references, language, log_mel=log_mel,
                           compute_loss=compute_loss, description=description, decode_language=decode_language,
                           language_id=language_id, assistant_model=assistant_model)
    if was_training:
        model.train()
    result.seconds = time.perf_counter() - started
    return result


def _evaluate(model, dataloader, accelerator, tokenizer, references: list[str], language: str, *, log_mel,
              compute_loss: bool, description: str, decode_language: str | None, language_id: bool,
              assistant_model=None) -> EvalResult:
    generator = accelerator.unwrap_model(model)
    engine_kwargs = generation_kwargs(accelerator)
    pad_id = generator.generation_config.pad_token_id
    indices, hypothesis_ids, failed, loss_sums, token_counts, detected = [], [], [], [], [], []
    drafts = {} if assistant_model is None else {"counts": DraftCounts()}
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
                                       decode_language, batch["durations"], assistant_model, **engine_kwargs,
                                       **drafts)
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
                                                   language_code(language))
    if compute_loss:
        metrics["loss"] = (torch.stack(loss_sums).sum() / torch.stack(token_counts).sum().clamp(min=1)).item()
    if drafts:
        metrics["speculative"] = speculative_summary(drafts["counts"], accelerator)
    metrics["num_utterances"] = len(predictions)
    metrics["num_failed"] = sum(failed)
    return EvalResult(metrics, predictions)


def speculative_summary(counts: DraftCounts, accelerator) -> dict:
    """Speculative decoding's counts summed over processes: the model's passes, the tokens they gave, the draft
    tokens proposed and kept, and the two ratios that say how well the assistant drafted."""
    totals = accelerator.reduce(torch.tensor([counts.model_passes, counts.tokens, counts.drafted, counts.accepted],
                                             device=accelerator.device), reduction="sum").tolist()
    passes, tokens, drafted, accepted = (int(total) for total in totals)
    return {"model_passes": passes, "tokens": tokens, "drafted": drafted, "accepted": accepted,
            "tokens_per_model_pass": round(tokens / max(passes, 1), 3),
            "draft_acceptance": round(accepted / max(drafted, 1), 3)}


def _per_row_loss(model, batch, encoder_outputs, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and target-token count per row, so the loss over a split is exact however the
    rows are batched and spread over processes."""
    losses = token_losses(model, batch, encoder_outputs, cache)
    return losses.sum(dim=1), batch["labels"].ne(IGNORE_INDEX).sum(dim=1)
