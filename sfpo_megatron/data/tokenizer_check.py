"""The load-time check that the tokenizer fits the data and the model: the first rows' prompts
and answers survive encode -> decode, and every token id is inside the model's vocabulary.

Without it a wrong tokenizer trains silently: a word-level ``tokenizer.json`` whose
``tokenizer_config.json`` names no class is loaded as the model family's byte-level BPE
(e.g. Qwen2's), which drops the words it cannot spell, and every reward is 0.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.data.prompts import PromptRecord, PromptSet

ROWS_CHECKED = 8
"""Round-trip the first this many rows of the training set."""


def comparable(text: str) -> str:
    """``text`` up to what tokenizers may rightly normalise: Unicode NFKC, whitespace runs
    as one space (SentencePiece's leading space, collapsed runs), no space at the ends."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _texts(record: PromptRecord) -> Iterator[tuple[str, str]]:
    """``(what, text)``: the prompt (or each message's content), then the answer if any."""
    if isinstance(record.prompt, str):
        yield "prompt", record.prompt
    else:
        for i, message in enumerate(record.prompt):
            yield f"prompt message {i}", message["content"]
    if record.answer:
        yield "answer", record.answer


def check_tokenizer(tokenizer: Any, directory: str, vocab_size: int, prompts: PromptSet) -> None:
    """:class:`ConfigError` unless the first :data:`ROWS_CHECKED` rows of ``prompts`` round-trip
    through ``tokenizer`` (plain text, no chat template) and every id of those texts, of the
    encoded prompts and of the eos token is below ``vocab_size`` (the model's)."""
    loaded = f"the tokenizer loaded from {directory} ({type(tokenizer).__name__})"
    advice = (
        "point data.tokenizer at the directory of the tokenizer this model was trained with, "
        'or name its class in that tokenizer_config.json ("tokenizer_class")'
    )

    def check_ids(ids: list[int], where: str) -> None:
        if ids and not (min(ids) >= 0 and max(ids) < vocab_size):  # C loops: every prompt
            outside = next(i for i in ids if not 0 <= i < vocab_size)
            raise ConfigError(
                f"{loaded} gives token id {outside} for {where}, outside the model's "
                f"vocab_size={vocab_size}; {advice}"
            )

    for record in prompts.records[:ROWS_CHECKED]:
        for what, text in _texts(record):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            decoded = tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if comparable(decoded) != comparable(text):
                raise ConfigError(
                    f"{loaded} does not round-trip the {what} of {record.where}: {text!r} "
                    f"encodes to {ids}, which decodes to {decoded!r}; {advice}"
                )
            check_ids(ids, f"the {what} of {record.where}")
    for record, ids in zip(prompts.records, prompts.token_ids, strict=True):
        check_ids(ids, f"the encoded prompt of {record.where}")
    if tokenizer.eos_token_id is not None:  # the session refuses a tokenizer without one
        check_ids([tokenizer.eos_token_id], "its eos token")
