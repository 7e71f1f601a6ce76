"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old log-probs -> GRPO or SFPO
update -> weight sync -> log, with evaluation, checkpoints and exact resume; and the HF export
entry point. Everything a run holds is built in :mod:`sfpo_megatron.training.session`."""

from __future__ import annotations

import time
from dataclasses import replace

import torch.distributed as dist

from sfpo_megatron.algorithms.experience import ScoredGroups, policy_batch, select_groups
from sfpo_megatron.config import Config, validate_lengths
from sfpo_megatron.data.rewards import check_error_fraction
from sfpo_megatron.hf.export import save_hf, source_dtype
from sfpo_megatron.hf.load import HFCheckpoint, load_hf_weights
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import ModelArch, hf_directory, read_hf_config
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.rollout.scoring import solved
from sfpo_megatron.training.session import Session


def start(cfg: Config, training: bool = False) -> tuple[ModelArch, HFCheckpoint | None]:
    """Check the config against the model and its weights (and, ``training``, its sequence
    lengths against the model's positions) before anything is started or written, then start
    the process groups. Returns the model shape and its weights."""
    arch = read_hf_config(cfg.model.hf_config)
    if training:
        validate_lengths(cfg, arch)
    checkpoint = None
    if cfg.model.load_weights:
        checkpoint = HFCheckpoint(hf_directory(cfg.model.hf_config))
        checkpoint.validate(arch)
    init_distributed(cfg, arch)
    return arch, checkpoint


def train(cfg: Config) -> list[dict[str, float]]:
    """Run (or resume) ``train.iterations`` RL iterations; returns this process's metrics.
    Raises :class:`~sfpo_megatron.training.stop_request.StopRequested` after a stop request."""
    arch, checkpoint = start(cfg, training=True)
    try:
        with Session.open(cfg, arch, checkpoint) as s:
            history = []
            for iteration in range(s.iteration + 1, cfg.train.iterations + 1):
                start_time = time.perf_counter()
                metrics = rl_iteration(s, iteration)
                metrics.update(s.after_iteration(iteration))
                metrics["seconds"] = time.perf_counter() - start_time
                metrics["tokens_per_s"] = metrics.pop("generated_tokens") / metrics["seconds"]
                s.log.log(iteration, metrics)
                history.append(metrics)
                if s.stopping:
                    s.stop_early(iteration)
            s.finish()
            return history
    finally:
        shutdown()


def rl_iteration(s: Session, iteration: int) -> dict[str, float]:
    """One iteration at theta0 = the weights the engine serves (version ``iteration - 1``)."""
    scored, metrics = collect_groups(s, iteration)
    s.release_rollout_memory()
    batch, rollout_logprobs = policy_batch(scored)
    clock = time.perf_counter()
    old_logprobs, _ = s.actor.forward_logprobs(batch)
    mask = batch.response_mask
    metrics["rollout_logprob_gap"] = float((old_logprobs - rollout_logprobs).abs()[mask].mean())
    batch = replace(batch, old_logprobs=old_logprobs)
    if s.reference is not None:
        batch = replace(batch, ref_logprobs=s.reference.logprobs(batch))
    metrics["time_old_logprobs"] = time.perf_counter() - clock

    clock = time.perf_counter()
    result = s.update.step(batch)
    metrics.update(result.metrics)
    metrics["time_update"] = time.perf_counter() - clock
    metrics["lr"] = s.actor.scheduler.get_lr(s.actor.optimizer.param_groups[0])
    s.actor.step_lr()
    metrics["alpha"] = result.alpha
    metrics["switched"] = float(result.switched)

    clock = time.perf_counter()
    s.sync(version=iteration)
    metrics["time_sync"] = time.perf_counter() - clock
    metrics["weight_version"] = float(iteration)
    metrics["response_length"] = float(mask.sum()) / batch.num_sequences
    return metrics


def collect_groups(s: Session, iteration: int) -> tuple[ScoredGroups, dict[str, float]]:
    """``prompts_per_step`` scored groups; with dynamic sampling, more rounds of prompts until
    enough groups carry signal (at most ``max_sampling_rounds``). Every sample of every round
    counts into the session's cumulative ``rollouts``. Raises
    :class:`~sfpo_megatron.data.rewards.RewardFailure` on every rank (their stats are the same) when
    reward errors reach ``reward.max_error_fraction`` of the iteration's samples."""
    t = s.cfg.train
    rounds: list[ScoredGroups] = []
    totals: dict[str, float] = {}
    informative = 0
    for round_index in range(t.max_sampling_rounds if t.dynamic_sampling else 1):
        items = s.prompts.next_batch(t.prompts_per_step)
        scored, stats = s.scorer.sample(items, s.sampling(iteration, round_index))
        rounds.append(scored)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        informative += sum(scored.informative(g) for g in range(scored.num_groups))
        if informative >= t.prompts_per_step:
            break
    rewards = [r for scored in rounds for r in scored.rewards]
    r = s.cfg.reward
    check_error_fraction(int(totals["reward_errors"]), len(rewards), r.max_error_fraction, r.fn)
    s.rollouts += len(rewards)
    totals["rollouts"] = s.rollouts
    totals["reward_mean"] = sum(rewards) / len(rewards)
    totals["accuracy"] = sum(map(solved, rewards)) / len(rewards)
    totals["groups_kept"] = float(min(informative, t.prompts_per_step))
    totals["sampling_rounds"] = float(len(rounds))
    return select_groups(rounds, t.prompts_per_step, t.dynamic_sampling), totals


def export_hf(cfg: Config, out: str, dtype: str | None = None) -> str:
    """Load the configured model through Megatron (resharded to the configured layout) and
    write it back as a HF checkpoint at ``out`` in ``dtype``; None = the source checkpoint's
    dtype (see :func:`source_dtype`), else ``model.dtype``. Returns the dtype written."""
    arch, checkpoint = start(cfg)
    try:
        source = hf_directory(cfg.model.hf_config)
        dtype = dtype or source_dtype(source, checkpoint) or cfg.model.dtype
        chunks = build_model(replace(cfg, model=replace(cfg.model, dtype=dtype)), arch)
        if checkpoint is not None:
            load_hf_weights(chunks, arch, checkpoint)
        save_hf(chunks, arch, source, out, cfg.checkpoint.export_shard_mb)
        if dist.get_rank() == 0:
            print(f"wrote {out} ({dtype})", flush=True)
        return dtype
    finally:
        shutdown()
