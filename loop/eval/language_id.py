"""Language identification: which language Whisper hears when it is not told.

Whisper detects the language from the first decoder step after `<|startoftranscript|>`: the most likely of its
language tokens. Fine-tuning with a forced language token never trains that step, yet it drifts (the decoder's
shared weights move), and a model that answers `<|hi|>` for English audio routes every unforced caller into
Hindi. The check reuses the encoder output an evaluation has already computed, so it costs one decoder step per
utterance.
"""

from __future__ import annotations

import torch


def language_token_ids(generation_config) -> dict[str, int]:
    """{language code: token id} from the model's own generation config (`lang_to_id` maps "<|hi|>" -> id; v3
    models hold one more language than v2, so the ids are never hard-coded)."""
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    if not lang_to_id:
        raise ValueError("the model's generation_config has no lang_to_id: it is not a multilingual Whisper, so it "
                         "cannot detect languages")
    return {token.strip("<|>"): token_id for token, token_id in lang_to_id.items()}


@torch.no_grad()
def detect_language_ids(model, encoder_outputs) -> torch.Tensor:
    """(batch,) the language token id Whisper predicts for each row of `encoder_outputs` (the encoder's output for
    a batch, as `model.get_encoder()` returns it) after `<|startoftranscript|>`, with no language forced."""
    token_ids = torch.tensor(list(language_token_ids(model.generation_config).values()))
    hidden = encoder_outputs[0]  # a tuple or a BaseModelOutput: both index to last_hidden_state
    start = torch.full((hidden.shape[0], 1), model.generation_config.decoder_start_token_id, dtype=torch.long,
                       device=hidden.device)
    logits = model(encoder_outputs=(hidden,), decoder_input_ids=start, use_cache=False).logits[:, -1]
    token_ids = token_ids.to(logits.device)
    return token_ids[logits[:, token_ids].argmax(dim=-1)]


def language_id_share(detected: list[str], expected: str) -> float:
    """Percent of `detected` codes equal to `expected` (a code such as "hi"); 0.0 for no utterances."""
    return 100.0 * sum(code == expected for code in detected) / len(detected) if detected else 0.0
