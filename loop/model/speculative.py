"""Speculative decoding, written out: a small assistant drafts tokens, the model checks them in one forward pass.

The output is the model's own greedy output, token for token: a draft token is kept only where the model, given the
same prefix, chooses it itself, and the first token it does not keep is replaced by the model's choice. What makes
it faster than plain greedy decoding is that the model runs once per draft rather than once per token, and the
assistant's passes are cheap:
- an assistant made by `scripts/make_student.py` with the encoder copied whole (and frozen in distillation) has the
  model's encoder weights; the model's encoder output then serves both, so the assistant never encodes;
- each pass is one forward call with a key/value cache, cropped back to the kept prefix after a rejection; no
  `generate` call per draft (transformers' assisted generation makes one, which on a CPU costs more than a small
  decoder's pass).

The draft length adapts as in transformers' assisted generation: two more after a fully accepted draft, one fewer
after a rejection; and a draft ends early after a token the assistant is unsure of (`DRAFT_CONFIDENCE`). The model's choice at each position goes through the rules plain greedy decoding applies, read
from its generation config: `suppress_tokens`, `begin_suppress_tokens` at the first generated token,
`no_repeat_ngram_size`, the duration cap (`loop.model.decoding_options`) and the length limit. The assistant's
drafts go through the same rules (a draft that breaks them would be rejected anyway).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
from transformers.modeling_outputs import BaseModelOutput

from loop.languages import language_code
from loop.model.decoding_options import MIN_NEW_TOKENS

FIRST_DRAFT_TOKENS = 5
MAX_DRAFT_TOKENS = 16
# A draft ends after a token the assistant gives less than this probability (transformers' assisted generation
# stops drafts the same way, at 0.4): such a token is likely rejected, and so is everything drafted after it.
DRAFT_CONFIDENCE = 0.4
# Generation settings plain greedy decoding would apply that this decoder does not, with their inactive values.
UNSUPPORTED = {"repetition_penalty": (None, 1.0), "min_length": (None, 0), "min_new_tokens": (None, 0),
               "bad_words_ids": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
               "encoder_repetition_penalty": (None, 1.0), "encoder_no_repeat_ngram_size": (None, 0),
               "exponential_decay_length_penalty": (None,), "do_sample": (None, False),
               "num_beams": (None, 1)}


def unsupported_settings(settings) -> list[str]:
    """The generation config's settings this decoder does not apply, as `name=value` (each would change plain
    greedy decoding's output, so speculative decoding cannot reproduce it)."""
    return [f"{name}={getattr(settings, name)!r}" for name, inactive in UNSUPPORTED.items()
            if getattr(settings, name, None) not in inactive]


def prompt_ids(settings, language: str) -> list[int]:
    """<|startoftranscript|><|lang|><|task|><|notimestamps|>: the decoder prompt `generate` starts from."""
    prompt = [settings.decoder_start_token_id]
    if getattr(settings, "lang_to_id", None) and language:  # English-only models have no language token
        prompt.append(settings.lang_to_id[f"<|{language_code(language)}|>"])
    if getattr(settings, "task_to_id", None):
        prompt.append(settings.task_to_id[settings.task or "transcribe"])
    return prompt + [settings.no_timestamps_token_id]


def same_encoder_weights(model, other) -> bool:
    """Whether `other`'s encoder has `model`'s weights, bit for bit (a student of `scripts/make_student.py` with all
    encoder layers, never trained there), so that in eval mode `model`'s encoder output is `other`'s too."""
    ours, theirs = model.get_encoder().state_dict(), other.get_encoder().state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[name].shape == theirs[name].shape and torch.equal(ours[name], theirs[name].to(ours[name].device))
        for name in ours)


@dataclass
class GreedyRules:
    """What plain greedy decoding does to the scores at each position, for one row: the prompt's length, the
    suppressed tokens, the end token, how many tokens may be generated (the length limit, and the duration cap
    when it is on)."""

    prompt_length: int
    end: int
    max_new_tokens: int
    suppress: list[int]
    begin_suppress: list[int]
    cap: int | None = None
    no_repeat: NoRepeatNGramLogitsProcessor | None = None

    def choose(self, sequence: list[int], scores: torch.Tensor) -> int:
        """The greedy choice after `sequence` (prompt and generated tokens) from its (vocab,) scores."""
        return int(torch.argmax(self.constrained(sequence, scores)))

    def constrained(self, sequence: list[int], scores: torch.Tensor) -> torch.Tensor:
        """The (vocab,) scores after `sequence` with the rules applied: float32, suppressed tokens at -inf, only
        the end token left once the cap is reached."""
        scores = scores.float().clone()
        generated = len(sequence) - self.prompt_length
        if self.suppress:
            scores[self.suppress] = -math.inf
        if generated == 0 and self.begin_suppress:
            scores[self.begin_suppress] = -math.inf
        if self.no_repeat is not None:
            ids = torch.tensor([sequence], device=scores.device)
            scores = self.no_repeat(ids, scores[None])[0]
        if self.cap is not None and generated >= self.cap:
            scores[:] = -math.inf
            scores[self.end] = 0.0
        return scores


def greedy_rules(settings, prompt_length: int, seconds: float | None, max_positions: int) -> GreedyRules:
    """The rules of `generate`'s plain greedy decoding for `settings` (a Whisper generation config), for a model of
    `max_positions` decoder positions. Whisper's generate counts `max_length` after the prompt (it adds the
    prompt's length to it), `max_new_tokens` too; both within the decoder's positions."""
    end = settings.eos_token_id[0] if isinstance(settings.eos_token_id, (list, tuple)) else settings.eos_token_id
    limit = min(settings.max_new_tokens if settings.max_new_tokens is not None else settings.max_length,
                max_positions - prompt_length)
    rules = GreedyRules(prompt_length, end, limit, list(settings.suppress_tokens or []),
                        list(settings.begin_suppress_tokens or []))
    tokens_per_second = getattr(settings, "max_new_tokens_per_second", None)
    if tokens_per_second and seconds is not None:
        rules.cap = max(math.ceil(seconds * tokens_per_second), MIN_NEW_TOKENS)
    if settings.no_repeat_ngram_size:
        rules.no_repeat = NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size)
    return rules


class Decoder:
    """One model's decoder over one row's encoder output, with its key/value cache: `feed` runs new tokens through
    it and returns their next-token scores; `keep` crops the cache back to a prefix."""

    def __init__(self, model, encoder_output: torch.Tensor):
        self.model = model
        self.encoder_output = BaseModelOutput(last_hidden_state=encoder_output)
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # transformers 5.25 renamed the forward's `past_key_values` to `cache`, and `crop` takes the tokens to
        # remove (negative) instead of the length to keep
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.crop_removes = "tokens_to_remove" in inspect.signature(self.cache.crop).parameters
        self.length = 0  # tokens in the cache

    def feed(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.encoder_output.last_hidden_state.device)
        logits = self.model(encoder_outputs=self.encoder_output, decoder_input_ids=ids, use_cache=True,
                            **{self.cache_argument: self.cache}).logits
        self.length += len(tokens)
        return logits[0]

    def keep(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length if self.crop_removes else length)
            self.length = length


@dataclass
class DraftCounts:
    """How a row went: the model's forward passes, the tokens it produced and the draft tokens it kept."""

    model_passes: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0


@torch.no_grad()
def speculative_row(model, assistant, encoder_output: torch.Tensor, assistant_encoder_output: torch.Tensor,
                    prompt: list[int], rules: GreedyRules, counts: DraftCounts | None = None) -> list[int]:
    """`model`'s greedy tokens after `prompt` for one row ((1, frames, width) encoder outputs), the end token
    included when it is reached, found with `assistant`'s drafts."""
    counts = counts if counts is not None else DraftCounts()
    target, helper = Decoder(model, encoder_output), Decoder(assistant, assistant_encoder_output)
    sequence = list(prompt)
    draft_tokens = FIRST_DRAFT_TOKENS
    while True:
        room = rules.max_new_tokens - (len(sequence) - rules.prompt_length)
        if room <= 0 or sequence[-1] == rules.end and len(sequence) > len(prompt):
            break
        draft: list[int] = []
        pending = sequence[helper.length:]
        while len(draft) < min(draft_tokens, room - 1):
            probabilities = torch.softmax(rules.constrained(sequence + draft, helper.feed(pending)[-1]), dim=-1)
            confidence, token = probabilities.max(dim=-1)
            token = int(token)
            draft.append(token)
            pending = [token]
            if token == rules.end or float(confidence) < DRAFT_CONFIDENCE:
                break
        scores = target.feed(sequence[target.length:] + draft)
        counts.model_passes += 1
        counts.drafted += len(draft)
        offset = scores.shape[0] - len(draft) - 1  # scores row of the choice after the last token of `sequence`
        before, kept = len(sequence), 0
        while True:
            choice = rules.choose(sequence, scores[offset + kept])
            sequence.append(choice)
            if kept < len(draft) and choice == draft[kept] and choice != rules.end:
                kept += 1
                continue
            break
        counts.accepted += kept
        target.keep(len(sequence) - 1)  # it has run the kept drafts, not the token just chosen
        helper.keep(min(helper.length, before + kept))  # it has run all but its last draft
        draft_tokens = min(draft_tokens + 2, MAX_DRAFT_TOKENS) if kept == len(draft) else max(1, draft_tokens - 1)
    generated = sequence[len(prompt):][:rules.max_new_tokens]
    counts.tokens += len(generated)
    return generated
