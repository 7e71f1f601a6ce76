"""The whole run's configuration: one field per section, and the rules that span sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sfpo_megatron.config.checks import require
from sfpo_megatron.config.io import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    RewardConfig,
    RolloutConfig,
)
from sfpo_megatron.config.model import ModelConfig, ParallelConfig
from sfpo_megatron.config.training import AlgorithmConfig, OptimizerConfig, TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def sequences_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    @property
    def sequences_per_mini_batch(self) -> int:
        return self.train.mini_batch_prompts * self.train.samples_per_prompt

    @property
    def longest_sequence(self) -> int:
        """Prompt + response tokens of the longest sequence a rollout can produce."""
        return self.data.max_prompt_length + self.rollout.max_response_length

    @property
    def token_budget(self) -> int:
        """Tokens per packed micro-batch (``train.max_tokens_per_micro_batch``)."""
        budget = self.train.max_tokens_per_micro_batch
        return budget if budget is not None else self.train.micro_batch_size * self.longest_sequence

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every section's own rules, then the rules that need more than one section (all of
        them need nothing but the config; :mod:`~sfpo_megatron.config.layout` has the rest)."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        t, o = self.train, self.optimizer
        require(
            t.warm_start_steps == 0 or t.warm_start_lr is not None or o.lr > 0,
            f"train.warm_start_steps={t.warm_start_steps} would run at LR 0 "
            f"(train.warm_start_lr=null means optimizer.lr={o.lr}): set train.warm_start_lr > 0",
        )
        require(
            self.token_budget >= self.longest_sequence,
            f"train.max_tokens_per_micro_batch={self.token_budget} is below the longest "
            f"sequence: data.max_prompt_length={self.data.max_prompt_length} + "
            f"rollout.max_response_length={self.rollout.max_response_length} = "
            f"{self.longest_sequence} tokens",
        )
        require(
            not (t.packing and self.model.attention == "local"),
            "train.packing=true needs model.attention=auto or sdpa: Megatron's local "
            "attention (model.attention=local) cannot keep packed sequences apart; set "
            "train.packing=false to use it",
        )
        require(
            t.off_policy_steps == 0 or self.rollout.engine == "servers",
            f"train.off_policy_steps=1 overlaps generation with training, which needs rollout "
            f"servers on devices of their own (rollout.engine=servers); rollout.engine="
            f"{self.rollout.engine} generates on the trainer's devices (and, embedded, in its "
            f"process): use train.off_policy_steps=0",
        )
        require(
            t.warm_start_steps == 0 or self.data.require_answer,
            f"train.warm_start_steps={t.warm_start_steps} trains on the reference answers: it "
            "needs data.require_answer=true",
        )
