"""Sampling and scoring for the trainer: the samples end up on global rank 0 (generated there,
or by engines on several ranks: :mod:`~sfpo_megatron.rollout.engine_group`), where the
tokenizer's decode and the reward processes live; every rank receives the same scored
samples."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

from sfpo_megatron.algorithms.experience import ScoredGroups
from sfpo_megatron.common.errors import ConfigError, RolloutError
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.data.prompts import BatchItem, PromptRecord
from sfpo_megatron.data.rewards import (
    REWARD_SIGNATURE,
    RewardComputer,
    RewardFn,
    probe_reward_fn,
)
from sfpo_megatron.launch.parallel import on_lead
from sfpo_megatron.rollout.engine_group import Generation, Rollouts

T = TypeVar("T")


def solved(reward: float) -> bool:
    """A sample counts as correct (accuracy, avg@k) when it earns the full reward."""
    return reward >= 1.0


def retried(action: Callable[[], T], recover: Callable[[], bool]) -> T:
    """``action``, and once more after a :class:`RolloutError` if ``recover()`` (collective)
    brought the rollout engines back; else the error is raised."""
    try:
        return action()
    except RolloutError:
        if not recover():
            raise
    return action()


def check_reward_fn(spec: str, fn: RewardFn, timeout_s: float, record: PromptRecord) -> None:
    """Collective, before the run starts: rank 0 calls the reward function once on ``record``
    (its answer as the response); if that fails, every rank raises :class:`ConfigError`."""
    problem = on_lead(lambda: probe_reward_fn(fn, timeout_s, record.answer, record.source))
    if problem is not None:
        raise ConfigError(
            f"reward.fn={spec!r} {problem} when called on {record.where} (its answer as the "
            f"response; reward.timeout_s={timeout_s:g}). The trainer calls {REWARD_SIGNATURE}."
        )


class RolloutScorer:
    """Generates ``n`` samples per prompt and scores them against the reference answers.

    ``generate`` is called on every rank; only rank 0 holds ``decode`` and ``rewards`` (None
    elsewhere); :meth:`sample` is collective and returns identical results on every rank.
    """

    def __init__(
        self,
        generate: Generation,
        decode: Callable[[list[int]], str] | None,
        rewards: RewardComputer | None,
        recover: Callable[[], bool] = lambda: False,
    ) -> None:
        self.generate, self.decode, self.rewards = generate, decode, rewards
        self.recover = recover

    def sample(
        self, items: list[BatchItem], params: SamplingParams
    ) -> tuple[ScoredGroups, dict[str, float]]:
        """Collective. A rollout failure on any engine reaches every rank (none is left waiting
        for samples that never come); the batch is sampled once more if ``recover()``
        (collective) brought the engines back, else :class:`RolloutError` is raised everywhere."""
        return retried(lambda: self._sample_once(items, params), self.recover)

    def sample_on_lead(
        self, items: list[BatchItem], params: SamplingParams
    ) -> tuple[ScoredGroups, dict[str, float]]:
        """What :meth:`sample` returns, made by global rank 0 alone (no collective), for
        engines rank 0 drives alone (rollout servers): the off-policy loop samples the next
        batch this way in a thread while every rank trains."""
        start = time.perf_counter()
        return self._score(
            items, params, self.generate([ids for _, ids, _ in items], params), start
        )

    def _sample_once(
        self, items: list[BatchItem], params: SamplingParams
    ) -> tuple[ScoredGroups, dict[str, float]]:
        start = time.perf_counter()
        rollouts = self.generate([ids for _, ids, _ in items], params)
        return on_lead(lambda: self._score(items, params, rollouts, start))

    def _score(
        self, items: list[BatchItem], params: SamplingParams, rollouts: Rollouts, start: float
    ) -> tuple[ScoredGroups, dict[str, float]]:
        samples, engine_stats = rollouts()
        generated = time.perf_counter()
        records = [items[s.prompt_index][2] for s in samples]
        rewards, counts = self.rewards.score(
            [self.decode(s.output_ids) for s in samples],
            [r.answer for r in records],
            [r.source for r in records],
        )
        stats = {
            "time_rollout": generated - start,
            "time_reward": time.perf_counter() - generated,
            "generated_tokens": float(sum(len(s.output_ids) for s in samples)),
            **engine_stats,
            **{key: float(value) for key, value in counts.items()},
        }
        return ScoredGroups(samples, rewards, params.n), stats

    def evaluate(
        self, items: list[BatchItem], params: SamplingParams, chunk: int
    ) -> dict[str, float]:
        """avg@k (k = ``params.n``): the share of solved samples per problem, averaged per data
        source (``eval/<source>``) and over sources (``eval/macro``)."""
        per_source: dict[str, list[float]] = defaultdict(list)
        for begin in range(0, len(items), chunk):
            part = items[begin : begin + chunk]
            scored, _ = self.sample(part, params)
            for index, (_, _, record) in enumerate(part):
                group = scored.group(index).rewards
                per_source[record.source].append(sum(map(solved, group)) / len(group))
        result = {f"eval/{source}": sum(v) / len(v) for source, v in sorted(per_source.items())}
        result["eval/macro"] = sum(result.values()) / len(result)
        return result
