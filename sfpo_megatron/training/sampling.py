"""How a run samples: training rounds and evaluation, each with a seed that depends only on
(``data.seed``, iteration, slot), so a resumed run draws the same samples as an uninterrupted
one."""

from __future__ import annotations

from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.config import SEEDS_PER_ITERATION, Config

EVAL_SLOT = SEEDS_PER_ITERATION - 1
"""The seed slot of an iteration's evaluation; training rounds use the slots below it."""


def sampling_seed(data_seed: int, iteration: int, slot: int) -> int:
    """The sampling seed of one round (``slot`` = its index) or of the evaluation
    (:data:`EVAL_SLOT`) of ``iteration``: distinct for every (iteration, slot), and a function
    of nothing else."""
    return data_seed * 1_000_003 + iteration * SEEDS_PER_ITERATION + slot


def training_sampling(cfg: Config, eos: int, iteration: int, round_index: int) -> SamplingParams:
    """The sampling of training round ``round_index`` of ``iteration``."""
    r = cfg.rollout
    return SamplingParams(
        n=cfg.train.samples_per_prompt,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_response_length,
        stop_token_ids=(eos,),
        seed=sampling_seed(cfg.data.seed, iteration, round_index),
    )


def eval_sampling(cfg: Config, eos: int, iteration: int) -> SamplingParams:
    """The sampling of the evaluation after ``iteration`` (``eval.k`` samples per problem)."""
    e = cfg.eval
    return SamplingParams(
        n=e.k,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=cfg.rollout.max_response_length,
        stop_token_ids=(eos,),
        seed=sampling_seed(cfg.data.seed, iteration, EVAL_SLOT),
    )
