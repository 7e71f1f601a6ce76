"""An iteration's training batch from the rollout engines: sampling rounds (more of them with
dynamic sampling), the reward checks and the rollout statistics. Collected at once (every
rank, collective), or one step off-policy (``train.off_policy_steps: 1``): sampled on global
rank 0 in a thread while the actor trains on the previous batch (:class:`InFlight`), the
rollout servers doing the generating, and shared with every rank when joined."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch.distributed as dist

from sfpo_megatron.algorithms.experience import ScoredGroups, select_groups
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.data.prompts import BatchItem
from sfpo_megatron.data.rewards import check_error_fraction
from sfpo_megatron.launch.parallel import on_lead
from sfpo_megatron.rollout.engine_group import engine_rates
from sfpo_megatron.rollout.scoring import solved
from sfpo_megatron.training.build import Run

Sampler = Callable[[list[BatchItem], SamplingParams], tuple[ScoredGroups, dict[str, float]]]


@dataclass
class Rounds:
    """The sampling rounds of one iteration, before the batch is chosen from them."""

    scored: list[ScoredGroups] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    informative: int = 0


@dataclass
class Collected:
    """One iteration's batch: ``prompts_per_step`` scored groups and the rollout metrics."""

    scored: ScoredGroups
    stats: dict[str, float]


def sample_rounds(run: Run, iteration: int, sample: Sampler) -> Rounds:
    """``prompts_per_step`` prompts a round; with dynamic sampling, more rounds until enough
    groups carry signal (at most ``max_sampling_rounds``)."""
    t = run.cfg.train
    rounds = Rounds()
    for round_index in range(t.max_sampling_rounds if t.dynamic_sampling else 1):
        items = run.prompts.next_batch(t.prompts_per_step)
        scored, stats = sample(items, run.sampling(iteration, round_index))
        rounds.scored.append(scored)
        for key, value in stats.items():
            rounds.stats[key] = rounds.stats.get(key, 0.0) + value
        rounds.informative += sum(scored.informative(g) for g in range(scored.num_groups))
        if rounds.informative >= t.prompts_per_step:
            break
    return rounds


def choose_batch(run: Run, rounds: Rounds) -> Collected:
    """The batch and its metrics (every rank). Every sample of every round counts into the
    run's cumulative ``rollouts``. Raises :class:`~sfpo_megatron.data.rewards.RewardFailure`
    on every rank when reward errors reach ``reward.max_error_fraction`` of the samples."""
    t, r = run.cfg.train, run.cfg.reward
    totals = dict(rounds.stats)
    rewards = [reward for scored in rounds.scored for reward in scored.rewards]
    check_error_fraction(int(totals["reward_errors"]), len(rewards), r.max_error_fraction, r.fn)
    run.rollouts += len(rewards)
    totals["rollouts"] = run.rollouts
    totals["reward_mean"] = sum(rewards) / len(rewards)
    totals["accuracy"] = sum(map(solved, rewards)) / len(rewards)
    totals["groups_kept"] = float(min(rounds.informative, t.prompts_per_step))
    totals["sampling_rounds"] = float(len(rounds.scored))
    totals.update(engine_rates(totals))
    scored = select_groups(rounds.scored, t.prompts_per_step, t.dynamic_sampling)
    return Collected(scored, totals)


def collect_groups(run: Run, iteration: int) -> Collected:
    """Collective: the batch of ``iteration``, sampled now."""
    return choose_batch(run, sample_rounds(run, iteration, run.scorer.sample))


class InFlight:
    """The batch of ``iteration``, sampled on global rank 0 in a thread while the caller goes
    on training; it is generated with the weights the servers hold now (one version before
    the policy it will train). Only rank 0's engines work in it: no collective runs there."""

    def __init__(self, run: Run, iteration: int) -> None:
        self.iteration = iteration
        self._future: Future | None = None
        if dist.get_rank() == 0:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
            self._future = pool.submit(sample_rounds, run, iteration, run.scorer.sample_on_lead)
            pool.shutdown(wait=False)

    def join(self, run: Run) -> Collected:
        """Collective: wait for the batch and share it (a rollout failure on rank 0 raises
        :class:`~sfpo_megatron.common.errors.RolloutError` on every rank). The prompts rank 0
        drew are drawn on every rank, so every rank's data position stays the same."""
        start = time.perf_counter()
        rounds, prompts = on_lead(lambda: (self._future.result(), run.prompts.state_dict()))
        run.prompts.load_state_dict(prompts)
        collected = choose_batch(run, rounds)
        collected.stats["time_rollout_wait"] = time.perf_counter() - start
        return collected
