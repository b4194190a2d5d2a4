"""The special-token layout and mel bins of a Whisper checkpoint, read from its own files and checked to agree.

Whisper's generations differ where the data path looks: large-v3 and large-v3-turbo take 128 mel bins (80 before)
and have a 100th language token, <|yue|> (50358), which moves <|translate|>, <|transcribe|>, <|startoflm|>,
<|startofprev|>, <|nospeech|>, <|notimestamps|> and every timestamp up by one. The loop never writes an id down:
labels take their prefix from the model's tokenizer (`prefix_tokens`), generation its language and task ids from
the model's generation config (`lang_to_id`, `task_to_id`), the features their mel bins from the model's feature
extractor. What can still go wrong is a folder whose files disagree (a v2 processor beside v3 weights, an edited
generation config) or a language the tokenizer does not have: transformers' `prefix_tokens` finds a language's id by
its position in a 100-language list, so on a v2 tokenizer <|yue|> silently comes out as <|translate|>. `check_layout`
refuses both before anything is prepared or trained.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A checkpoint whose tokenizer, generation config and feature extractor disagree; the message says which."""


@dataclass(frozen=True)
class TokenLayout:
    """The ids the data path, generation and decoding use, as one checkpoint's tokenizer has them."""

    end: int
    start: int
    languages: dict[str, int]
    """`<|hi|>` -> id, for every language token the tokenizer has."""
    translate: int
    transcribe: int
    no_timestamps: int
    num_mel_bins: int

    @property
    def first_timestamp(self) -> int:
        """<|0.00|>: generation takes it as the id after <|notimestamps|> (some Hub tokenizers lack the timestamp
        tokens as added tokens and decode them by this arithmetic)."""
        return self.no_timestamps + 1

    @classmethod
    def of(cls, processor) -> TokenLayout:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        tokenizer = processor.tokenizer
        added = tokenizer.get_added_vocab()
        return cls(
            end=added["<|endoftext|>"], start=added["<|startoftranscript|>"],
            languages={f"<|{code}|>": added[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in added},
            translate=added["<|translate|>"], transcribe=added["<|transcribe|>"],
            no_timestamps=added["<|notimestamps|>"],
            num_mel_bins=processor.feature_extractor.feature_size,
        )

    def prefix(self, language_code: str, task: str) -> list[int]:
        """<|startoftranscript|><|lang|><|task|><|notimestamps|>, the label prefix without timestamps."""
        return [self.start, self.languages[f"<|{language_code}|>"],
                self.transcribe if task == "transcribe" else self.translate, self.no_timestamps]


def check_layout(name: str, model, processor, language_code: str, task: str) -> TokenLayout:
    """Raises `LayoutError` unless `model`'s config and generation config and `processor` (the checkpoint `name`)
    agree on the mel bins and on every special id the loop uses, and the tokenizer has `language_code`'s token;
    returns the layout."""
    try:
        layout = TokenLayout.of(processor)
    except KeyError as error:
        raise LayoutError(f"the tokenizer of {name!r} lacks Whisper's special token {error}: is it a Whisper "
                          "tokenizer?") from error
    token = f"<|{language_code}|>"
    if token not in layout.languages:
        raise LayoutError(
            f"the tokenizer of {name!r} has no {token} token ({len(layout.languages)} language tokens; <|yue|> "
            "exists from large-v3 on): choose another model.language or a model that has it"
        )
    settings, config = model.generation_config, model.config
    problems = []
    if layout.num_mel_bins != config.num_mel_bins:
        problems.append(f"its feature extractor makes {layout.num_mel_bins} mel bins, the model takes "
                        f"{config.num_mel_bins} (large-v3 and turbo take 128, earlier models 80)")
    expected = {
        "decoder_start_token_id": (config.decoder_start_token_id, layout.start),
        f"lang_to_id[{token}]": ((getattr(settings, "lang_to_id", None) or {}).get(token), layout.languages[token]),
        f"task_to_id[{task}]": ((getattr(settings, "task_to_id", None) or {}).get(task),
                                layout.transcribe if task == "transcribe" else layout.translate),
        "no_timestamps_token_id": (getattr(settings, "no_timestamps_token_id", None), layout.no_timestamps),
    }
    problems += [f"its {key} is {found}, its tokenizer's id is {wanted}"
                 for key, (found, wanted) in expected.items() if found != wanted]
    prefix = processor.tokenizer.prefix_tokens
    if prefix != layout.prefix(language_code, task):
        problems.append(f"its tokenizer's label prefix is {prefix}, not {layout.prefix(language_code, task)}")
    if problems:
        raise LayoutError(f"the files of {name!r} disagree: " + "; ".join(problems)
                          + ". Take config.json, generation_config.json and the processor files from one checkpoint.")
    return layout
