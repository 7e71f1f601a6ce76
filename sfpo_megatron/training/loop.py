"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old log-probs -> GRPO or SFPO
update -> weight sync -> log, with evaluation, checkpoints and exact resume. What a run holds
is built in :mod:`~sfpo_megatron.training.build`, started in
:mod:`~sfpo_megatron.training.start`; what follows each iteration is in
:mod:`~sfpo_megatron.training.hooks`."""

from __future__ import annotations

import time
from dataclasses import replace

from sfpo_megatron.algorithms.experience import ScoredGroups, policy_batch, select_groups
from sfpo_megatron.config import Config
from sfpo_megatron.data.rewards import check_error_fraction
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.rollout.engine_group import engine_rates
from sfpo_megatron.rollout.scoring import solved
from sfpo_megatron.training.build import Run, build_run
from sfpo_megatron.training.hooks import after_iteration, finish, stop_early
from sfpo_megatron.training.preflight import launch_checked
from sfpo_megatron.training.start import start_run


def train(cfg: Config) -> list[dict[str, float]]:
    """Run (or resume) ``train.iterations`` RL iterations; returns this process's metrics.
    Raises :class:`~sfpo_megatron.training.stop_request.StopRequested` after a stop request."""
    arch, hf_weights = launch_checked(cfg, training=True)
    try:
        with build_run(cfg, arch, hf_weights) as run:
            metrics_log = start_run(run)
            history = []
            for iteration in range(run.iteration + 1, cfg.train.iterations + 1):
                start_time = time.perf_counter()
                metrics = rl_iteration(run, iteration)
                metrics.update(after_iteration(run, iteration))
                metrics["seconds"] = time.perf_counter() - start_time
                metrics["tokens_per_s"] = metrics.pop("generated_tokens") / metrics["seconds"]
                metrics_log.log(iteration, metrics)
                history.append(metrics)
                if run.stopping:
                    stop_early(run, iteration)
            finish(run)
            return history
    finally:
        shutdown()


def rl_iteration(run: Run, iteration: int) -> dict[str, float]:
    """One iteration at theta0 = the weights the engine serves (version ``iteration - 1``)."""
    scored, metrics = collect_groups(run, iteration)
    run.rollout.release()
    batch, rollout_logprobs = policy_batch(scored)
    clock = time.perf_counter()
    old_logprobs, _ = run.actor.forward_logprobs(batch)
    mask = batch.response_mask
    metrics["rollout_logprob_gap"] = float((old_logprobs - rollout_logprobs).abs()[mask].mean())
    batch = replace(batch, old_logprobs=old_logprobs)
    if run.kl_reference is not None:
        batch = replace(batch, ref_logprobs=run.kl_reference.logprobs(batch))
    metrics["time_old_logprobs"] = time.perf_counter() - clock

    clock = time.perf_counter()
    result = run.update.step(batch)
    metrics.update(result.metrics)
    metrics["time_update"] = time.perf_counter() - clock
    metrics["lr"] = run.actor.scheduler.get_lr(run.actor.optimizer.param_groups[0])
    run.actor.step_lr()
    metrics["alpha"] = result.alpha
    metrics["switched"] = float(result.switched)

    clock = time.perf_counter()
    run.rollout.sync(version=iteration)
    metrics["time_sync"] = time.perf_counter() - clock
    metrics["weight_version"] = float(iteration)
    metrics["response_length"] = float(mask.sum()) / batch.num_sequences
    return metrics


def collect_groups(run: Run, iteration: int) -> tuple[ScoredGroups, dict[str, float]]:
    """``prompts_per_step`` scored groups; with dynamic sampling, more rounds of prompts until
    enough groups carry signal (at most ``max_sampling_rounds``). Every sample of every round
    counts into the run's cumulative ``rollouts``. Raises
    :class:`~sfpo_megatron.data.rewards.RewardFailure` on every rank (their stats are the same) when
    reward errors reach ``reward.max_error_fraction`` of the iteration's samples."""
    t = run.cfg.train
    rounds: list[ScoredGroups] = []
    totals: dict[str, float] = {}
    informative = 0
    for round_index in range(t.max_sampling_rounds if t.dynamic_sampling else 1):
        items = run.prompts.next_batch(t.prompts_per_step)
        scored, stats = run.scorer.sample(items, run.sampling(iteration, round_index))
        rounds.append(scored)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        informative += sum(scored.informative(g) for g in range(scored.num_groups))
        if informative >= t.prompts_per_step:
            break
    rewards = [r for scored in rounds for r in scored.rewards]
    r = run.cfg.reward
    check_error_fraction(int(totals["reward_errors"]), len(rewards), r.max_error_fraction, r.fn)
    run.rollouts += len(rewards)
    totals["rollouts"] = run.rollouts
    totals["reward_mean"] = sum(rewards) / len(rewards)
    totals["accuracy"] = sum(map(solved, rewards)) / len(rewards)
    totals["groups_kept"] = float(min(informative, t.prompts_per_step))
    totals["sampling_rounds"] = float(len(rounds))
    totals.update(engine_rates(totals))
    return select_groups(rounds, t.prompts_per_step, t.dynamic_sampling), totals
