"""How the trainer's ranks get a batch of rollouts, as a collective call that leaves the
samples with global rank 0 (which scores them):

- :class:`LeadEngine`: one engine (an SGLang server pool, or one embedded engine) used by
  rank 0 alone;
- :class:`EngineGroup`: data-parallel rollout without servers: an embedded engine on several
  ranks, each generating its share of the prompts at the same time.

Either returns a thunk that rank 0 calls inside :func:`~sfpo_megatron.launch.parallel.on_lead`,
so a failure raised there reaches every rank as :class:`RolloutError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch.distributed as dist

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.common.samples import RolloutEngine, Sample, SamplingParams
from sfpo_megatron.rollout.embedded import EmbeddedEngine

Rollouts = Callable[[], tuple[list[Sample], dict[str, float]]]
"""Rank 0's samples (prompt-major, ``params.n`` per prompt) and per-engine statistics."""


class Generation(Protocol):
    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts | None:
        """Collective; the thunk on global rank 0, None elsewhere."""
        ...


class LeadEngine:
    """Rank 0's engine generates the whole batch (inside the thunk)."""

    def __init__(self, engine: RolloutEngine | None) -> None:
        self.engine = engine

    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts | None:
        if self.engine is None:
            return None
        return lambda: (self.engine.generate(prompts, params), {})


def shares(prompts: int, engines: int) -> list[range]:
    """Contiguous, balanced slices of the prompts, one per engine (in prompt order)."""
    return [range(e * prompts // engines, (e + 1) * prompts // engines) for e in range(engines)]


class EngineGroup:
    """Engine ``e`` lives on global rank ``engine_ranks[e]`` (``engine`` is this rank's, None
    on ranks without one) and samples prompts ``shares(...)[e]`` with their batch-wide prompt
    indices, so the samples are those one engine would draw for the whole batch."""

    def __init__(self, engine: EmbeddedEngine | None, engine_ranks: list[int]) -> None:
        self.engine, self.engine_ranks = engine, engine_ranks

    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts | None:
        rank = dist.get_rank()
        part = None
        if self.engine is not None:
            share = shares(len(prompts), len(self.engine_ranks))[self.engine_ranks.index(rank)]
            part = self._generate([prompts[i] for i in share], params, share.start)
        parts: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank != 0:
            return None
        return lambda: _assemble([parts[r] for r in self.engine_ranks])

    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, first: int
    ) -> tuple[list[Sample] | None, str | None, float]:
        """This engine's samples (batch-wide prompt indices), or the error it failed with."""
        start = time.perf_counter()
        try:
            samples = self.engine.generate(prompts, params, first_prompt=first)
        except Exception as failure:  # any engine failure fails the batch on every rank
            return None, f"{type(failure).__name__}: {failure}", time.perf_counter() - start
        for sample in samples:
            sample.prompt_index += first
        return samples, None, time.perf_counter() - start


def _assemble(
    parts: list[tuple[list[Sample] | None, str | None, float]],
) -> tuple[list[Sample], dict[str, float]]:
    failed = [f"engine {e}: {error}" for e, (_, error, _) in enumerate(parts) if error]
    if failed:
        raise RolloutError(f"rollout failed on {len(failed)} engine(s): {'; '.join(failed)}")
    samples: list[Sample] = []
    stats: dict[str, float] = {}
    for e, (part, _, seconds) in enumerate(parts):
        samples += part
        stats[f"rollout_rows_engine{e}"] = float(len(part))
        stats[f"rollout_tokens_engine{e}"] = float(sum(len(s.output_ids) for s in part))
        stats[f"time_rollout_engine{e}"] = seconds
    return samples, stats


def engine_rates(stats: dict[str, float]) -> dict[str, float]:
    """``tokens_per_s_engine<e>`` for every engine in ``stats`` (the sums over an iteration's
    sampling rounds)."""
    return {
        f"tokens_per_s_engine{key.removeprefix('time_rollout_engine')}": (
            stats[key.replace("time_rollout", "rollout_tokens")] / max(seconds, 1e-9)
        )
        for key, seconds in stats.items()
        if key.startswith("time_rollout_engine")
    }
