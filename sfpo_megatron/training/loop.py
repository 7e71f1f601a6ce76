"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old log-probs -> GRPO or SFPO
update -> weight sync -> log, with evaluation, checkpoints and exact resume. What a run holds
is built in :mod:`~sfpo_megatron.training.build`, started in
:mod:`~sfpo_megatron.training.start`; what follows each iteration is in
:mod:`~sfpo_megatron.training.hooks`."""

from __future__ import annotations

import time
from dataclasses import replace

from sfpo_megatron.algorithms.experience import policy_batch
from sfpo_megatron.config import Config
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.policy.rollout_correction import correction_weights
from sfpo_megatron.training.build import Run, build_run
from sfpo_megatron.training.collection import InFlight, collect_groups
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
    """One iteration at theta0 = the weights of version ``iteration - 1``. Its batch was
    sampled with them, or one step off-policy (``train.off_policy_steps: 1``) with version
    ``iteration - 2`` while the previous iteration trained; it then samples the next batch
    while it trains, and holds it in ``run.next_batch`` until the next iteration."""
    collected = run.next_batch or collect_groups(run, iteration)
    run.next_batch = None
    in_flight = None
    if run.cfg.train.off_policy_steps and iteration < run.cfg.train.iterations:
        in_flight = InFlight(run, iteration + 1)
    metrics = dict(collected.stats)
    versions = [s.weight_version for s in collected.scored.samples]
    metrics["rollout_weight_version"] = sum(versions) / len(versions)
    metrics["rollout_staleness"] = iteration - 1 - metrics["rollout_weight_version"]
    run.rollout.release()
    batch, rollout_logprobs = policy_batch(collected.scored)
    clock = time.perf_counter()
    old_logprobs, _ = run.actor.forward_logprobs(batch)
    mask = batch.response_mask
    weights, mismatch = correction_weights(old_logprobs, rollout_logprobs, mask, run.cfg.algorithm)
    metrics.update(mismatch)
    batch = replace(batch, old_logprobs=old_logprobs, rollout_weights=weights)
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

    if in_flight is not None:
        run.next_batch = in_flight.join(run)
    clock = time.perf_counter()
    run.rollout.sync(version=iteration)
    metrics["time_sync"] = time.perf_counter() - clock
    metrics["weight_version"] = float(iteration)
    metrics["response_length"] = float(mask.sum()) / batch.num_sequences
    return metrics
