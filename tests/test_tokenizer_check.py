"""The load-time tokenizer check: prompts and answers must round-trip and fit the model's
vocabulary, else a ConfigError naming the tokenizer class and ``data.tokenizer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.data.prompts import PromptRecord, PromptSet, load_prompts, load_tokenizer
from sfpo_megatron.data.tokenizer_check import check_tokenizer, comparable

from conftest import REPO, write_hf_config

DIGITS = REPO / "examples/models/tiny-digits"
PROBLEMS = REPO / "examples/tasks/digits/problems.jsonl"
WORDS = ["<unk>", "<eos>", "sort", "=", *map(str, range(10))]


def word_level_beside_qwen2(directory: Path) -> Path:
    """A word-level tokenizer.json whose tokenizer_config.json names no class, beside a qwen2
    config.json: transformers loads it as Qwen2's byte-level BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    write_hf_config(directory, "qwen2")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<eos>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def prompt_set(tokenizer, rows: list[tuple[str, str]]) -> PromptSet:
    records = [PromptRecord(p, a, "s", i + 1, "d.jsonl") for i, (p, a) in enumerate(rows)]
    encode = lambda r: tokenizer.encode(r.prompt, add_special_tokens=False)  # noqa: E731
    return PromptSet(records, encode, max_prompt_length=64, seed=0)


def test_the_demo_tokenizer_passes():
    tokenizer = load_tokenizer(str(DIGITS))
    records, _ = load_prompts([str(PROBLEMS)])
    encode = lambda r: tokenizer.encode(r.prompt, add_special_tokens=False)  # noqa: E731
    check_tokenizer(tokenizer, str(DIGITS), 15, PromptSet(records, encode, 8, seed=0))


def test_a_word_level_tokenizer_loaded_as_qwen2_bpe_is_refused(tmp_path):
    directory = word_level_beside_qwen2(tmp_path / "model")
    tokenizer = load_tokenizer(str(directory))
    ids = tokenizer.encode("sort 3 9 1 4 =", add_special_tokens=False)
    assert "sort" not in tokenizer.decode(ids)  # the defect the check is for
    with pytest.raises(ConfigError) as err:
        check_tokenizer(
            tokenizer, str(directory), 300, prompt_set(tokenizer, [("sort 3 9 1 4 =", "1 3 4 9")])
        )
    message = str(err.value)
    assert f"the tokenizer loaded from {directory} ({type(tokenizer).__name__})" in message
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert "does not round-trip the prompt of d.jsonl, line 1: 'sort 3 9 1 4 ='" in message
    assert "point data.tokenizer at" in message


def test_a_tokenizer_that_normalises_whitespace_passes(tmp_path):
    from test_data import save_tokenizer

    tokenizer = load_tokenizer(save_tokenizer(tmp_path, None))  # WhitespaceSplit, no decoder
    prompts = prompt_set(tokenizer, [(" what  is\n1+1? ", "is")])
    check_tokenizer(tokenizer, str(tmp_path), 9, prompts)


def test_answers_are_checked_too(tmp_path):
    tokenizer = load_tokenizer(str(DIGITS))
    with pytest.raises(ConfigError, match=r"the answer of d.jsonl, line 2: 'x'"):
        check_tokenizer(
            tokenizer, str(DIGITS), 15, prompt_set(tokenizer, [("1+1=", "2"), ("2+2=", "x")])
        )


def test_ids_outside_the_model_vocabulary_are_refused():
    tokenizer = load_tokenizer(str(DIGITS))
    prompts = prompt_set(tokenizer, [("1+1=", "2")])
    with pytest.raises(ConfigError, match=r"token id 12 for the prompt of d.jsonl, line 1, "):
        check_tokenizer(tokenizer, str(DIGITS), 12, prompts)  # "+" is id 12
    chars = Chars()
    with pytest.raises(ConfigError, match=r"\(Chars\) gives token id 1000 for its eos token"):
        check_tokenizer(chars, "chars", 256, prompt_set(chars, [("a b", "c")]))


class Chars:
    """A tokenizer of one id per character, whose eos id is past a 256-token vocabulary."""

    eos_token_id = 1000

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **options: bool) -> str:
        return "".join(map(chr, ids))


def test_comparable_forgives_whitespace_and_unicode_forms_only():
    assert comparable(" what  is\n1+1? ") == comparable("what is 1+1?")
    assert comparable("e\u0301") == comparable("\u00e9")  # NFD and NFC
    assert comparable("3914=") != comparable("sort 3 9 1 4 =")
    assert comparable("1+3") != comparable("1 + 3")
