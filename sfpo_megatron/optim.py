"""Megatron's (distributed) optimizer and LR schedule from the run config."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from sfpo_megatron.config import Config
from sfpo_megatron.models.gpt import DTYPES


def build_optimizer(cfg: Config, chunks: list) -> tuple[object, OptimizerParamScheduler]:
    """AdamW with fp32 main params (for bf16/fp16 models), clipping, and the LR schedule.

    Weight decay skips biases and 1-D params (norm weights), Megatron's convention.
    """
    o = cfg.optimizer
    dtype = DTYPES[cfg.model.dtype]
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    # The schedule advances once per RL iteration, not per optimizer step (SFPO spec).
    decay_steps = max(cfg.train.iterations, o.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
