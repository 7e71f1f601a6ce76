"""The checks a run passes before anything is started or written: the config against the model
and its HF weights (then the process groups start), and the run's inputs (reward function,
tokenizer, prompt data) against the config and the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import Config, validate_lengths
from sfpo_megatron.data.prompts import (
    BatchItem,
    Encoder,
    PromptSet,
    chat_template_encoder,
    load_prompts,
    load_tokenizer,
)
from sfpo_megatron.data.rewards import load_reward_fn
from sfpo_megatron.data.tokenizer_check import check_tokenizer
from sfpo_megatron.hf.load import HFCheckpoint
from sfpo_megatron.launch.parallel import init_distributed
from sfpo_megatron.models.arch import ModelArch, hf_directory, read_hf_config
from sfpo_megatron.rollout.scoring import check_reward_fn

log = logging.getLogger(__name__)


def launch_checked(cfg: Config, training: bool = False) -> tuple[ModelArch, HFCheckpoint | None]:
    """Check the config against the model and its HF weights (and, ``training``, its sequence
    lengths against the model's positions), then start the process groups. Returns the model
    shape and the HF weights it starts from (None without ``model.load_weights``)."""
    arch = read_hf_config(cfg.model.hf_config)
    if training:
        validate_lengths(cfg, arch)
    hf_weights = None
    if cfg.model.load_weights:
        hf_weights = HFCheckpoint(hf_directory(cfg.model.hf_config))
        hf_weights.validate(arch)
    init_distributed(cfg, arch)
    return arch, hf_weights


@dataclass(frozen=True)
class RunInputs:
    """What a run reads besides the model: checked, on every rank."""

    tokenizer: Any  # a transformers tokenizer
    prompts: PromptSet
    eval_items: list[BatchItem]


def load_inputs(cfg: Config, arch: ModelArch) -> RunInputs:
    """Load and check the reward function, the tokenizer and the prompt data (collective: on
    every rank, so a bad input stops all of them at once)."""
    try:
        reward_fn = load_reward_fn(cfg.reward.fn)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        raise ConfigError(f"reward.fn: {error}") from error
    tokenizer_dir = cfg.data.tokenizer or str(hf_directory(cfg.model.hf_config))
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {tokenizer.name_or_path} has no eos token")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files must list at least one JSONL or Parquet file")
    encode = chat_template_encoder(tokenizer, cfg.data.use_chat_template)
    prompts = _prompt_set(cfg, "train", cfg.data.train_files, encode)
    eval_items = []
    if cfg.eval.files:
        eval_set = _prompt_set(cfg, "eval", cfg.eval.files, encode)
        eval_items = [(i, eval_set.token_ids[i], eval_set.records[i]) for i in range(len(eval_set))]
    check_tokenizer(tokenizer, tokenizer_dir, arch.vocab_size, prompts)
    check_reward_fn(cfg.reward.fn, reward_fn, cfg.reward.timeout_s, prompts.records[0])
    return RunInputs(tokenizer, prompts, eval_items)


def _prompt_set(cfg: Config, role: str, files: list[str], encode: Encoder) -> PromptSet:
    d = cfg.data
    records, counts = load_prompts(
        files, d.prompt_key, d.answer_key, d.source_key, d.skip_malformed, d.require_answer
    )
    prompts = PromptSet(records, encode, d.max_prompt_length, d.seed)
    log.info(
        "%s prompts from %s: %d of %d rows (%d malformed skipped, %d longer than "
        "data.max_prompt_length=%d dropped)",
        role,
        ", ".join(files),
        len(prompts),
        counts["rows_read"],
        counts["malformed_skipped"],
        prompts.dropped_too_long,
        d.max_prompt_length,
    )
    return prompts
