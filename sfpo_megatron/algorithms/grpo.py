"""The policy update per rollout batch: GRPO (one training pass) or SFPO."""

from __future__ import annotations

from typing import Any

from sfpo_megatron.algorithms.sfpo import SFPOUpdate
from sfpo_megatron.config import AlgorithmConfig
from sfpo_megatron.policy.batch import PolicyBatch


class GRPOUpdate:
    """One training pass over the batch."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def step(self, batch: PolicyBatch) -> dict[str, float]:
        return self.actor.train_pass(batch)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """GRPO keeps no state of its own."""


def build_update(cfg: AlgorithmConfig, actor) -> GRPOUpdate | SFPOUpdate:
    return SFPOUpdate(actor, cfg.sfpo) if cfg.name == "sfpo" else GRPOUpdate(actor)
