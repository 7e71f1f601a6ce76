"""The one face of a policy update: what the loop calls once per rollout batch, and what it
gets back. GRPO and SFPO both implement it; :func:`sfpo_megatron.algorithms.build_update`
picks one by ``algorithm.name``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sfpo_megatron.policy.batch import PolicyBatch


@dataclass(frozen=True)
class UpdateResult:
    """What one :meth:`PolicyUpdate.step` did."""

    metrics: dict[str, float]
    """The loss stats of the (slow) training pass and the update's phase times."""
    alpha: float
    """The alpha of the reposition applied this iteration; 0.0 when none ran."""
    slow_fast: bool
    """Whether the SFPO structure (fast passes, reposition, slow pass) ran."""
    switched: bool
    """Whether the entropy switch has ended SFPO (its state after this step)."""


class PolicyUpdate(Protocol):
    """One policy update per rollout batch; its state goes into training checkpoints."""

    def step(self, batch: PolicyBatch) -> UpdateResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
