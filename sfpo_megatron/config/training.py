"""The ``train``, ``optimizer`` and ``algorithm`` sections: batch geometry, AdamW and its
schedule, and the policy update (GRPO, SFPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sfpo_megatron.config.checks import above, at_least, require, within

SEEDS_PER_ITERATION = 64
"""Sampling seeds each iteration owns: one per dynamic-sampling round, the last evaluation's."""
MAX_SAMPLING_ROUNDS = SEEDS_PER_ITERATION - 1


@dataclass
class TrainConfig:
    iterations: int = 1
    prompts_per_step: int = 256
    samples_per_prompt: int = 8
    """Group size n of GRPO: responses sampled per prompt."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step; a training pass makes prompts_per_step / this many steps."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank when ``packing`` is false;
    with packing, sets the default ``max_tokens_per_micro_batch``."""
    packing: bool = True
    """Lay whole sequences end to end in each micro-batch (attention within a sequence,
    positions restarting) so the actor computes only real tokens; false pads every row to
    the batch's longest (for comparison and debugging)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of a packed micro-batch; None = ``micro_batch_size`` x the longest
    possible sequence (``data.max_prompt_length + rollout.max_response_length``): the
    memory of a padded micro-batch at the cap."""
    off_policy_steps: Literal[0, 1] = 0
    """1: generate the next batch while the actor trains on this one (with the weights of
    one update before: samples are at most one version stale); 0: one phase after another.
    Needs rollouts in other processes on other devices (``rollout.engine: servers``). Pair
    it with ``algorithm.rollout_correction: tis``, which kept the demo's accuracy."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts
    until ``prompts_per_step`` groups have signal (or ``max_sampling_rounds`` is reached)."""
    max_sampling_rounds: int = 4
    """At most :data:`MAX_SAMPLING_ROUNDS` (each round draws from its own sampling seed)."""
    warm_start_steps: int = 0
    """Supervised optimizer steps on the prompts' reference answers before RL (demo models
    that start from random weights); 0 = none. Skipped when resuming from a checkpoint."""
    warm_start_lr: float | None = None
    """Constant learning rate of the warm-start steps; None = ``optimizer.lr``. The RL LR
    schedule (its warm-up included) starts after the warm start, untouched by it."""

    def validate(self) -> None:
        for key in ("iterations", "prompts_per_step", "mini_batch_prompts", "micro_batch_size"):
            at_least(f"train.{key}", getattr(self, key), 1)
        require(
            self.samples_per_prompt >= 2,
            f"train.samples_per_prompt={self.samples_per_prompt} must be >= 2 (group advantages)",
        )
        require(
            self.prompts_per_step % self.mini_batch_prompts == 0,
            f"train.prompts_per_step={self.prompts_per_step} must be a multiple of "
            f"train.mini_batch_prompts={self.mini_batch_prompts}",
        )
        if self.max_tokens_per_micro_batch is not None:
            at_least("train.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, 1)
        at_least("train.max_sampling_rounds", self.max_sampling_rounds, 1)
        require(
            self.max_sampling_rounds <= MAX_SAMPLING_ROUNDS,
            f"train.max_sampling_rounds={self.max_sampling_rounds} must be <= "
            f"{MAX_SAMPLING_ROUNDS} (each round of an iteration draws from its own sampling seed)",
        )
        at_least("train.warm_start_steps", self.warm_start_steps, 0)
        if self.warm_start_lr is not None:
            require(
                self.warm_start_steps > 0,
                f"train.warm_start_lr={self.warm_start_lr} is set but train.warm_start_steps=0 "
                f"(no warm start runs)",
            )
            above("train.warm_start_lr", self.warm_start_lr, 0)


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    """The end of a linear or cosine schedule; in [0, lr]."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    decay_norms_and_biases: bool = False
    """False: weight decay skips biases and norm weights (every 1-D param; Megatron's
    convention). True: every parameter decays (the SFPO reference code and verl)."""

    def validate(self) -> None:
        at_least("optimizer.lr", self.lr, 0)
        require(
            0 <= self.min_lr <= self.lr,
            f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]",
        )
        at_least("optimizer.warmup_steps", self.warmup_steps, 0)
        at_least("optimizer.weight_decay", self.weight_decay, 0)
        within("optimizer.adam_beta1", self.adam_beta1, 0, 1, open_high=True)
        within("optimizer.adam_beta2", self.adam_beta2, 0, 1, open_high=True)
        above("optimizer.adam_eps", self.adam_eps, 0)
        above("optimizer.clip_grad", self.clip_grad, 0)


@dataclass
class SFPOConfig:
    inner_steps: int = 3
    """K: fast training passes on the same batch before the reposition."""
    alpha: float = 0.8
    """Reposition theta0 + alpha (thetaK - theta0)."""
    switch_to_grpo: bool = True
    """Switch to GRPO for good once the entropy z-score crosses ``tau`` (formerly
    ``adaptive``)."""
    window: int = 30
    """omega: entropy values in the z-score window (the current one included)."""
    tau: float = 1.0
    one_sided: bool = True
    """True: switch on Z >= tau (the reference code); False: on |Z| >= tau (the paper)."""
    snapshot: Literal["gpu", "host"] = "gpu"
    """Where theta0 is kept: device memory, or pinned host memory (0 extra device bytes)."""

    def validate(self) -> None:
        at_least("algorithm.sfpo.inner_steps", self.inner_steps, 1)
        within("algorithm.sfpo.alpha", self.alpha, 0, 1)
        at_least("algorithm.sfpo.window", self.window, 2)
        above("algorithm.sfpo.tau", self.tau, 0)


@dataclass
class AlgorithmConfig:
    name: Literal["grpo", "sfpo"] = "sfpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    """> clip_eps_low turns on clip-higher (DAPO)."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus subtracted from the loss; 0 = none."""
    kl_coef: float = 0.0
    """KL-to-reference weight (low-variance k3 estimator); 0 needs no reference model."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Train-inference mismatch correction of the policy-gradient term, from the ratio
    pi_old / pi_rollout: ``tis`` weights each token by min(ratio, C); ``mis`` drops the tokens
    (or sequences) whose ratio lies outside [1/C, C] from the policy gradient."""
    rollout_correction_c: float = 2.0
    """C of ``rollout_correction`` (> 1; ``.inf``: TIS is plain importance sampling)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """``mis``: judge each token's ratio, or each sequence's (the product over its tokens)."""
    sfpo: SFPOConfig = field(default_factory=SFPOConfig)

    def validate(self) -> None:
        above("algorithm.rollout_correction_c", self.rollout_correction_c, 1)
        within("algorithm.clip_eps_low", self.clip_eps_low, 0, 1, open_high=True)
        require(
            self.clip_eps_high >= self.clip_eps_low,
            f"algorithm.clip_eps_high={self.clip_eps_high} must be >= "
            f"algorithm.clip_eps_low={self.clip_eps_low}",
        )
        at_least("algorithm.entropy_coef", self.entropy_coef, 0)
        at_least("algorithm.kl_coef", self.kl_coef, 0)
        self.sfpo.validate()
