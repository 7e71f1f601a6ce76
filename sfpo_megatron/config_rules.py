"""The rules a configuration must satisfy, each failure a :class:`ConfigError` naming the key.

:func:`validate` needs only the config (run at load time); :func:`validate_layout` needs the
model shape and the world size too (TP divides heads, PP divides layers, world = TP x PP x DP)
and runs once both are known; :func:`validate_lengths` (training only) needs the model shape.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from sfpo_megatron.common.errors import ConfigError

if TYPE_CHECKING:
    from sfpo_megatron.config import Config, OptimizerConfig, TrainConfig
    from sfpo_megatron.models.arch import ModelArch


SEEDS_PER_ITERATION = 64
"""Sampling seeds each iteration owns: one per dynamic-sampling round, the last evaluation's."""
MAX_SAMPLING_ROUNDS = SEEDS_PER_ITERATION - 1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Rules that need nothing but the config itself."""
    p, t, o, a = cfg.parallel, cfg.train, cfg.optimizer, cfg.algorithm
    _require(bool(cfg.model.hf_config), "model.hf_config must name a Hugging Face config.json")
    for key, value in [
        ("parallel.tensor", p.tensor),
        ("parallel.pipeline", p.pipeline),
        ("train.iterations", t.iterations),
        ("train.prompts_per_step", t.prompts_per_step),
        ("train.samples_per_prompt", t.samples_per_prompt),
        ("train.mini_batch_prompts", t.mini_batch_prompts),
        ("train.micro_batch_size", t.micro_batch_size),
        ("model.vocab_pad_multiple", cfg.model.vocab_pad_multiple),
        ("parallel.timeout_s", p.timeout_s),
        ("logging.log_interval", cfg.logging.log_interval),
        ("train.max_sampling_rounds", t.max_sampling_rounds),
        ("eval.k", cfg.eval.k),
    ]:
        _require(value >= 1, f"{key}={value} must be >= 1")
    _require(
        t.max_sampling_rounds <= MAX_SAMPLING_ROUNDS,
        f"train.max_sampling_rounds={t.max_sampling_rounds} must be <= {MAX_SAMPLING_ROUNDS} "
        f"(each round of an iteration draws from its own sampling seed)",
    )
    _require(
        p.data is None or p.data >= 1, f"parallel.data={p.data} must be >= 1 (or null to derive)"
    )
    if p.virtual_pipeline is not None:
        _require(
            p.virtual_pipeline >= 1, f"parallel.virtual_pipeline={p.virtual_pipeline} must be >= 1"
        )
        _require(
            p.virtual_pipeline == 1 or p.pipeline > 1,
            f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1",
        )
    _require(
        not p.sequence_parallel or p.tensor > 1,
        "parallel.sequence_parallel=true needs parallel.tensor > 1",
    )
    _require(
        not p.overlap_param_gather or p.distributed_optimizer,
        "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true",
    )
    _require(
        t.prompts_per_step % t.mini_batch_prompts == 0,
        f"train.prompts_per_step={t.prompts_per_step} must be a multiple of "
        f"train.mini_batch_prompts={t.mini_batch_prompts}",
    )
    _require(o.lr >= 0, f"optimizer.lr={o.lr} must be >= 0")
    _require(0 <= o.min_lr <= o.lr, f"optimizer.min_lr={o.min_lr} must be in [0, optimizer.lr]")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    _require(o.clip_grad > 0, f"optimizer.clip_grad={o.clip_grad} must be > 0")
    _require(0 <= o.adam_beta1 < 1, f"optimizer.adam_beta1={o.adam_beta1} must be in [0, 1)")
    _require(0 <= o.adam_beta2 < 1, f"optimizer.adam_beta2={o.adam_beta2} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _require(0 <= a.clip_eps_low < 1, f"algorithm.clip_eps_low={a.clip_eps_low} must be in [0, 1)")
    _require(
        a.clip_eps_high >= a.clip_eps_low,
        f"algorithm.clip_eps_high={a.clip_eps_high} must be >= algorithm.clip_eps_low",
    )
    _require(a.kl_coef >= 0, f"algorithm.kl_coef={a.kl_coef} must be >= 0")
    f = a.sfpo
    _require(f.inner_steps >= 1, f"algorithm.sfpo.inner_steps={f.inner_steps} must be >= 1")
    _require(0 <= f.alpha <= 1, f"algorithm.sfpo.alpha={f.alpha} must be in [0, 1]")
    _require(f.window >= 2, f"algorithm.sfpo.window={f.window} must be >= 2")
    _require(f.tau > 0, f"algorithm.sfpo.tau={f.tau} must be > 0")
    _require(
        cfg.rollout.temperature > 0, f"rollout.temperature={cfg.rollout.temperature} must be > 0"
    )
    _require(0 < cfg.rollout.top_p <= 1, f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    _require(
        cfg.rollout.max_response_length >= 1,
        f"rollout.max_response_length={cfg.rollout.max_response_length} must be >= 1",
    )
    _require(
        cfg.data.max_prompt_length >= 1,
        f"data.max_prompt_length={cfg.data.max_prompt_length} must be >= 1",
    )
    _require(
        cfg.checkpoint.export_shard_mb > 0,
        f"checkpoint.export_shard_mb={cfg.checkpoint.export_shard_mb} must be > 0",
    )
    _require(
        cfg.checkpoint.interval >= 0, f"checkpoint.interval={cfg.checkpoint.interval} must be >= 0"
    )
    _require(
        cfg.checkpoint.interval == 0 or cfg.checkpoint.dir is not None,
        "checkpoint.interval > 0 needs checkpoint.dir",
    )
    _require(
        cfg.checkpoint.resume != "auto" or cfg.checkpoint.dir is not None,
        "checkpoint.resume=auto needs checkpoint.dir",
    )
    for name in cfg.checkpoint.stop_signals:
        stop_signal(name)
    _require(
        cfg.checkpoint.stop_file != "",
        "checkpoint.stop_file must name a file (null turns the stop file off)",
    )
    _validate_warm_start(t, o)
    _require(
        t.warm_start_steps == 0 or cfg.data.require_answer,
        f"train.warm_start_steps={t.warm_start_steps} trains on the reference answers: it needs "
        "data.require_answer=true",
    )
    _require(
        t.samples_per_prompt >= 2,
        f"train.samples_per_prompt={t.samples_per_prompt} must be >= 2 (group advantages)",
    )
    _require(
        cfg.rollout.top_k == -1 or cfg.rollout.top_k >= 1,
        f"rollout.top_k={cfg.rollout.top_k} must be -1 (off) or >= 1",
    )
    r = cfg.rollout
    _require(
        r.engine != "servers" or bool(r.server_urls),
        "rollout.engine=servers needs rollout.server_urls",
    )
    _require(r.server_tp >= 1, f"rollout.server_tp={r.server_tp} must be >= 1")
    _require(
        r.engine != "colocated" or not r.server_urls,
        "rollout.engine=colocated launches its own servers: rollout.server_urls must be empty",
    )
    _require(
        r.request_timeout_s > 0, f"rollout.request_timeout_s={r.request_timeout_s} must be > 0"
    )
    _require(r.kv_cache_gb > 0, f"rollout.kv_cache_gb={r.kv_cache_gb} must be > 0")
    _require(cfg.reward.workers >= 0, f"reward.workers={cfg.reward.workers} must be >= 0")
    _require(cfg.reward.timeout_s > 0, f"reward.timeout_s={cfg.reward.timeout_s} must be > 0")
    _require(
        0 <= cfg.reward.max_error_fraction <= 1,
        f"reward.max_error_fraction={cfg.reward.max_error_fraction} must be in [0, 1]",
    )
    e = cfg.eval
    _require(e.interval >= 0, f"eval.interval={e.interval} must be >= 0")
    _require(e.interval == 0 or bool(e.files), "eval.interval > 0 needs eval.files")
    _require(e.temperature > 0, f"eval.temperature={e.temperature} must be > 0")
    _require(0 < e.top_p <= 1, f"eval.top_p={e.top_p} must be in (0, 1]")


def _validate_warm_start(t: TrainConfig, o: OptimizerConfig) -> None:
    """The warm start runs at its own constant LR; one that could not train is refused."""
    _require(t.warm_start_steps >= 0, f"train.warm_start_steps={t.warm_start_steps} must be >= 0")
    if t.warm_start_lr is not None:
        _require(
            t.warm_start_steps > 0,
            f"train.warm_start_lr={t.warm_start_lr} is set but train.warm_start_steps=0 "
            f"(no warm start runs)",
        )
        _require(t.warm_start_lr > 0, f"train.warm_start_lr={t.warm_start_lr} must be > 0")
    _require(
        t.warm_start_steps == 0 or t.warm_start_lr is not None or o.lr > 0,
        f"train.warm_start_steps={t.warm_start_steps} would run at LR 0 "
        f"(train.warm_start_lr=null means optimizer.lr={o.lr}): set train.warm_start_lr > 0",
    )


def validate_lengths(cfg: Config, arch: ModelArch) -> None:
    """A training run's prompt + response must fit the model's positions."""
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.max_response_length
    _require(
        prompt + response <= arch.max_position_embeddings,
        f"data.max_prompt_length={prompt} + rollout.max_response_length={response} = "
        f"{prompt + response} tokens exceed the model's max_position_embeddings="
        f"{arch.max_position_embeddings} of model.hf_config={cfg.model.hf_config}",
    )


def stop_signal(name: str) -> signal.Signals:
    """The signal a ``checkpoint.stop_signals`` entry names (``USR1`` or ``SIGUSR1``)."""
    full = name if name.startswith("SIG") else f"SIG{name}"
    _require(
        full in signal.Signals.__members__ and full not in ("SIGKILL", "SIGSTOP"),
        f"checkpoint.stop_signals: {name!r} is not a signal a process can catch "
        f"(names as `kill -l` lists them: USR1, USR2, INT, ...)",
    )
    return signal.Signals[full]


def _data_parallel_size(cfg: Config, world_size: int) -> int:
    """DP size for this world; checks world size = TP x PP x DP."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline
    _require(
        world_size % model_parallel == 0,
        f"world size {world_size} must be divisible by parallel.tensor x parallel.pipeline "
        f"= {p.tensor} x {p.pipeline}",
    )
    dp = world_size // model_parallel
    _require(
        p.data is None or p.data == dp,
        f"parallel.data={p.data} but world size {world_size} = tensor {p.tensor} x pipeline "
        f"{p.pipeline} x data {dp}",
    )
    return dp


def validate_layout(cfg: Config, arch: ModelArch, world_size: int) -> int:
    """Rules that need the model shape and the world size; returns the DP size."""
    p, t = cfg.parallel, cfg.train
    num_heads, num_query_groups = arch.num_attention_heads, arch.num_query_groups
    num_layers = arch.num_layers
    _require(
        num_heads % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide the model's num_attention_heads={num_heads}",
    )
    _require(
        num_query_groups % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide the model's num_key_value_heads="
        f"{num_query_groups} (query groups)",
    )
    _require(
        arch.ffn_hidden_size % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide the model's intermediate_size="
        f"{arch.ffn_hidden_size}",
    )
    stages = p.pipeline * (p.virtual_pipeline or 1)
    _require(
        num_layers % stages == 0,
        f"parallel.pipeline={p.pipeline} x parallel.virtual_pipeline={p.virtual_pipeline or 1} "
        f"must divide the model's num_hidden_layers={num_layers}",
    )
    dp = _data_parallel_size(cfg, world_size)
    r = cfg.rollout
    _require(
        r.engine != "colocated" or world_size % r.server_tp == 0,
        f"rollout.engine=colocated: rollout.server_tp={r.server_tp} must divide the world size "
        f"{world_size} (one engine per server_tp trainer ranks)",
    )
    per_rank = t.micro_batch_size * dp
    _require(
        cfg.sequences_per_mini_batch % per_rank == 0,
        f"a mini-batch of train.mini_batch_prompts x train.samples_per_prompt = "
        f"{cfg.sequences_per_mini_batch} sequences must split into train.micro_batch_size="
        f"{t.micro_batch_size} x data-parallel size {dp} (micro-batches x DP)",
    )
    if p.virtual_pipeline and p.virtual_pipeline > 1:
        micro_batches = cfg.sequences_per_mini_batch // per_rank
        _require(
            micro_batches % p.pipeline == 0,
            f"the interleaved schedule needs micro-batches per mini-batch ({micro_batches}) to be "
            f"a multiple of parallel.pipeline={p.pipeline}",
        )
    return dp
