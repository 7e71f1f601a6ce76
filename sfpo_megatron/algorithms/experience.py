"""From scored rollouts to the batch the actor trains on: group advantages, DAPO's dynamic
sampling (keep only groups whose rewards differ), and the padded token rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfpo_megatron.algorithms.advantages import group_advantages
from sfpo_megatron.common.samples import Sample
from sfpo_megatron.policy.batch import PolicyBatch


@dataclass
class ScoredGroups:
    """``len(rewards) / group_size`` groups of samples of one prompt each, prompt-major."""

    samples: list[Sample]
    rewards: list[float]
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.samples) // self.group_size

    def group(self, index: int) -> ScoredGroups:
        rows = slice(index * self.group_size, (index + 1) * self.group_size)
        return ScoredGroups(self.samples[rows], self.rewards[rows], self.group_size)

    def informative(self, index: int) -> bool:
        """Whether the group's rewards differ (else every advantage is 0: no learning signal)."""
        rewards = self.group(index).rewards
        return max(rewards) > min(rewards)


def select_groups(rounds: list[ScoredGroups], wanted: int, dynamic: bool) -> ScoredGroups:
    """``wanted`` groups from the sampling rounds, in order. With ``dynamic``, informative groups
    first (DAPO); when the rounds hold fewer than ``wanted`` of them, the batch is completed with
    uninformative groups (advantage 0: they add tokens to the mean but no gradient direction),
    so the batch geometry never changes."""
    groups = [r.group(i) for r in rounds for i in range(r.num_groups)]
    if dynamic:
        groups = [g for g in groups if g.informative(0)] + [
            g for g in groups if not g.informative(0)
        ]
    if len(groups) < wanted:
        raise ValueError(f"{len(groups)} groups sampled, {wanted} needed")
    chosen = groups[:wanted]
    return ScoredGroups(
        [s for g in chosen for s in g.samples],
        [r for g in chosen for r in g.rewards],
        rounds[0].group_size,
    )


def policy_batch(scored: ScoredGroups) -> tuple[PolicyBatch, torch.Tensor]:
    """Right-padded rows prompt + response with group advantages; also the rollout log-probs
    aligned like the actor's (for the rollout/actor log-prob gap)."""
    samples = scored.samples
    width = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    rollout_logprobs = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        start, stop = len(s.prompt_ids), len(s.prompt_ids) + len(s.output_ids)
        tokens[row, :stop] = torch.tensor(s.prompt_ids + s.output_ids)
        mask[row, start:stop] = True
        rollout_logprobs[row, start:stop] = torch.tensor(s.output_logprobs)
    advantages = group_advantages(torch.tensor(scored.rewards), scored.group_size)
    return PolicyBatch(tokens, mask, advantages=advantages), rollout_logprobs
