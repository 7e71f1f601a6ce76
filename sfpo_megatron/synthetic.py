"""Random prompt/response batches for smoke runs and tests before real rollouts exist."""

from __future__ import annotations

import torch

from sfpo_megatron.advantages import group_advantages
from sfpo_megatron.batch import PolicyBatch
from sfpo_megatron.config import Config
from sfpo_megatron.models.arch import ModelArch


def random_batch(cfg: Config, arch: ModelArch, generator: torch.Generator) -> PolicyBatch:
    """``prompts_per_step`` prompts x ``samples_per_prompt`` responses of random tokens and
    lengths, with random 0/1 rewards turned into group advantages. Identical on every rank
    when the generators are seeded alike."""
    n = cfg.sequences_per_step
    group = cfg.train.samples_per_prompt
    max_prompt, max_response = cfg.data.max_prompt_length, cfg.rollout.max_response_length
    prompt_len = torch.randint(
        1, max_prompt + 1, (cfg.train.prompts_per_step,), generator=generator
    ).repeat_interleave(group)
    response_len = torch.randint(1, max_response + 1, (n,), generator=generator)
    total = int((prompt_len + response_len).max())
    tokens = torch.randint(0, arch.vocab_size, (n, total), generator=generator)
    position = torch.arange(total).expand(n, -1)
    response_mask = (position >= prompt_len[:, None]) & (
        position < (prompt_len + response_len)[:, None]
    )
    tokens = tokens.masked_fill(position >= (prompt_len + response_len)[:, None], 0)
    rewards = torch.randint(0, 2, (n,), generator=generator).float()
    return PolicyBatch(tokens, response_mask, advantages=group_advantages(rewards, group))
