"""Megatron's (distributed) optimizer and LR schedule from the run config, and access to the
master weights it steps (for the SFPO reposition)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from sfpo_megatron.config import Config
from sfpo_megatron.models.gpt import DTYPES


def build_optimizer(cfg: Config, chunks: list) -> tuple[object, OptimizerParamScheduler]:
    """AdamW with fp32 main params (for bf16/fp16 models), clipping, and the LR schedule.

    Weight decay skips biases and 1-D params (norm weights), Megatron's convention, unless
    ``optimizer.decay_norms_and_biases``: then no param is exempt (an empty override table
    replaces Megatron's standard one).
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
    overrides = {} if o.decay_norms_and_biases else None
    optimizer = get_megatron_optimizer(config, chunks, config_overrides=overrides)
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


@contextmanager
def constant_lr(optimizer, lr: float) -> Iterator[None]:
    """Every param group steps at ``lr`` (times its ``lr_mult``) inside the block; their LRs
    are restored after it. The schedule is not consulted or stepped: its state is unchanged."""
    groups = optimizer.param_groups
    saved = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    try:
        yield
    finally:
        for group, value in zip(groups, saved, strict=True):
            group["lr"] = value


@dataclass
class MasterWeights:
    """This rank's fp32 master weights, as the optimizer steps them, in place.

    ``paired[i]`` is copied into the low-precision model-param slice ``models[i]`` (for a
    distributed optimizer: this rank's range of the DDP param buffer); ``alone`` are fp32
    master weights that are the model params themselves. Only this rank's shard appears.
    """

    paired: list[torch.Tensor]
    models: list[torch.Tensor]
    alone: list[torch.Tensor]

    @property
    def mains(self) -> list[torch.Tensor]:
        return self.paired + self.alone

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.mains)


def master_weights(optimizer) -> MasterWeights:
    """The master weights of Megatron's distributed, mixed-precision or fp32 optimizer."""
    weights = MasterWeights([], [], [])
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.config.use_precision_aware_optimizer:
            raise NotImplementedError(
                "use_precision_aware_optimizer keeps master weights inside TE's FusedAdam; "
                "the SFPO reposition does not support it"
            )
        if isinstance(inner, DistributedOptimizer):
            groups = (
                inner.shard_fp32_from_float16_groups,
                inner.shard_float16_groups,
                inner.shard_fp32_groups,
            )
        elif isinstance(inner, Float16OptimizerWithFloat16Params):
            groups = (
                inner.fp32_from_float16_groups,
                inner.float16_groups,
                inner.fp32_from_fp32_groups,
            )
        elif isinstance(inner, FP32Optimizer):
            groups = ([], [], [g["params"] for g in inner.optimizer.param_groups])
        else:
            raise TypeError(f"no master-weight access for {type(inner).__name__}")
        paired, models, alone = ([t for group in g for t in group] for g in groups)
        weights.paired += paired
        weights.models += models
        weights.alone += alone
    return weights
