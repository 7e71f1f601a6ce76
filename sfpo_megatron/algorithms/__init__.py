"""The policy updates behind one face (:class:`~sfpo_megatron.algorithms.update.PolicyUpdate`):
this is the one place that names the concrete classes."""

from __future__ import annotations

from sfpo_megatron.algorithms.grpo import GRPOUpdate
from sfpo_megatron.algorithms.sfpo import SFPOUpdate
from sfpo_megatron.algorithms.update import PolicyUpdate, UpdateResult
from sfpo_megatron.config import AlgorithmConfig

__all__ = ["PolicyUpdate", "UpdateResult", "build_update"]


def build_update(cfg: AlgorithmConfig, actor) -> PolicyUpdate:
    """The update ``algorithm.name`` names, on ``actor``."""
    if cfg.name == "sfpo":
        return SFPOUpdate(actor, cfg.sfpo)
    return GRPOUpdate(actor)
