"""Supervised warm start on the prompts' reference answers, for models that start from random
weights (the demo): RL from a policy that never earns a reward learns nothing.

Each step is one actor training pass over one mini-batch of prompt + answer + eos rows with
advantage 1 and old log-probs taken at the current weights: at ratio 1 the clipped GRPO
objective's gradient is exactly the token-mean log-likelihood gradient (plus the configured
entropy bonus), so no second loss is needed. The KL reference log-probs (with
``algorithm.kl_coef > 0``) are those same current log-probs: the k3 KL term and its gradient
are zero there, so it adds nothing; the KL reference of RL is the policy the warm start ends
with.

The steps run at the constant ``train.warm_start_lr`` (default ``optimizer.lr``) and never
step the LR schedule: RL starts its schedule, warm-up included, exactly as without a warm
start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from sfpo_megatron.common.errors import DataError
from sfpo_megatron.data.prompts import BatchItem, PromptSet
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.policy.optim import constant_lr

log = logging.getLogger(__name__)


def answer_batch(
    items: list[BatchItem],
    encode_answer: Callable[[str], list[int]],
    eos: int,
    max_response_length: int,
) -> PolicyBatch:
    """Rows prompt + answer + eos, the answer and eos marked as the response; an answer
    longer than a response may be is a :class:`DataError` (the actor's micro-batches and
    the model's positions are sized for responses)."""
    rows = []
    for _, ids, record in items:
        answer = encode_answer(record.answer) + [eos]
        if len(answer) > max_response_length:
            raise DataError(
                f"{record.where}: the warm start's answer + eos is {len(answer)} tokens, over "
                f"rollout.max_response_length={max_response_length}"
            )
        rows.append((ids, answer))
    width = max(len(p) + len(a) for p, a in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(rows):
        tokens[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, len(prompt) : len(prompt) + len(answer)] = True
    return PolicyBatch(tokens, mask, advantages=torch.ones(len(rows)))


def warm_start(
    actor,
    prompts: PromptSet,
    encode_answer: Callable[[str], list[int]],
    eos: int,
    steps: int,
    lr: float,
) -> None:
    """``steps`` supervised optimizer steps at learning rate ``lr``, each on the next mini-batch
    of ``prompts``; logs the answers' token-mean negative log-likelihood about ten
    times along the way."""
    rows = actor.cfg.sequences_per_mini_batch
    start = time.perf_counter()
    with constant_lr(actor.optimizer, lr):
        for step in range(1, steps + 1):
            items = prompts.next_batch(rows)
            batch = answer_batch(items, encode_answer, eos, actor.cfg.rollout.max_response_length)
            logprobs, _ = actor.forward_logprobs(batch)
            actor.train_pass(replace(batch, old_logprobs=logprobs, ref_logprobs=logprobs))
            if step % max(steps // 10, 1) == 0 or step == 1:
                nll = -float(logprobs.sum() / batch.response_mask.sum())
                elapsed = time.perf_counter() - start
                log.info("warm start %d/%d answer nll %.3f %.0fs", step, steps, nll, elapsed)
