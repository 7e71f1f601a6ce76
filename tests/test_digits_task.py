"""The demo task (examples/tasks/digits): generator, shipped files, tokenizer, reward; and
that every shipped config loads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from sfpo_megatron.config import load_config
from sfpo_megatron.data.prompts import load_prompts, load_tokenizer
from sfpo_megatron.data.rewards import load_reward_fn
from sfpo_megatron.models.arch import read_hf_config

from conftest import REPO

TASK = REPO / "examples" / "tasks" / "digits"
MODEL = REPO / "examples" / "models" / "tiny-digits"


def make_task():
    spec = importlib.util.spec_from_file_location("make_task", TASK / "make_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_problems_are_every_one_digit_sum_and_difference_and_correct():
    records, counts = load_prompts([str(TASK / "problems.jsonl")])
    assert counts == {"rows_read": 155, "malformed_skipped": 0}
    by_source = {s: [r for r in records if r.source == s] for s in ("add", "sub")}
    assert len(by_source["add"]) == 100 and len(by_source["sub"]) == 55
    assert all(str(eval(r.prompt[:-1])) == r.answer for r in records)  # noqa: S307 (a+b / a-b)
    assert len({r.prompt for r in records}) == 155


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    """What the generator writes today equals what ships, in what a run reads: the problems
    byte for byte, the tokenizer's vocabulary, encodings and special tokens, and the model
    shape and token ids of config.json (not the transformers_version stamp, which changes with
    every transformers release)."""
    task, model = tmp_path / "task", tmp_path / "model"
    subprocess.run(
        [
            sys.executable,
            str(TASK / "make_task.py"),
            "--task-dir",
            str(task),
            "--model-dir",
            str(model),
        ],
        check=True,
        capture_output=True,
    )
    assert (task / "problems.jsonl").read_bytes() == (TASK / "problems.jsonl").read_bytes()
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in MODEL.iterdir())
    shipped_tok, fresh_tok = load_tokenizer(str(MODEL)), load_tokenizer(str(model))
    assert fresh_tok.get_vocab() == shipped_tok.get_vocab()
    assert fresh_tok.all_special_tokens == shipped_tok.all_special_tokens
    for record in load_prompts([str(task / "problems.jsonl")])[0]:
        text = record.prompt + record.answer
        assert fresh_tok.encode(text) == shipped_tok.encode(text)
    assert read_hf_config(model) == read_hf_config(MODEL)
    shipped_cfg, fresh_cfg = (json.loads((d / "config.json").read_text()) for d in (MODEL, model))
    for key in ("eos_token_id", "pad_token_id", "bos_token_id", "model_type"):
        assert fresh_cfg[key] == shipped_cfg[key], key


def test_tokenizer_round_trips_and_matches_the_model_config():
    tokenizer = load_tokenizer(str(MODEL))
    config = json.loads((MODEL / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token_id == config["eos_token_id"] == 1
    for record in load_prompts([str(TASK / "problems.jsonl")])[0]:
        ids = tokenizer.encode(record.prompt + record.answer, add_special_tokens=False)
        assert len(ids) == len(record.prompt + record.answer)  # one token per character
        text = tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True)
        assert text == record.prompt + record.answer


@pytest.mark.parametrize(
    "response, reward", [("12", 1.0), (" 12 ", 1.0), ("1", 0.0), ("121", 0.0), ("", 0.0)]
)
def test_exact_match(response, reward):
    assert load_reward_fn(f"{TASK / 'reward.py'}:exact_match")(response, "12", "add") == reward


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(config):
    cfg = load_config(config)
    assert cfg.model.hf_config and cfg.data.train_files
