"""Whisper's languages: a name or code as users write it ("Hindi", "hindi", "hi") to the code the tokenizer's
`<|hi|>` token carries, and back to Whisper's name. The one place a language is looked up."""

from __future__ import annotations

import difflib

from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE


def language_code(language: str) -> str:
    """`hindi`, `Hindi` or `hi` -> `hi`; an unknown value comes back lower-cased (see `language_problem`)."""
    language = language.strip().lower()
    return TO_LANGUAGE_CODE.get(language, language)


def language_name(language: str) -> str:
    """`hi` or `hindi` -> `hindi` (Whisper's name for it); unknown values come back unchanged."""
    return LANGUAGES.get(language_code(language), language)


def is_whisper_language(language: str) -> bool:
    return language_code(language) in LANGUAGES


def language_problem(language: str, option: str) -> str:
    """Why `option=language` is not a Whisper language, with the nearest name as a hint, or "" when it is one."""
    if is_whisper_language(language):
        return ""
    hint = difflib.get_close_matches(language.strip().lower(), list(TO_LANGUAGE_CODE), n=1)
    return f"{option} {language!r} is not a Whisper language" + (f" (did you mean {hint[0]!r}?)" if hint else "")
