"""The GRPO update: one training pass over the rollout batch."""

from __future__ import annotations

from typing import Any

from sfpo_megatron.algorithms.update import UpdateResult
from sfpo_megatron.policy.batch import PolicyBatch


class GRPOUpdate:
    """One training pass over the batch; no reposition, no switch, no state of its own."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def step(self, batch: PolicyBatch) -> UpdateResult:
        metrics = self.actor.train_pass(batch)
        return UpdateResult(metrics, alpha=0.0, slow_fast=False, switched=False)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """GRPO keeps no state of its own."""
