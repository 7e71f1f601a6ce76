"""Correcting the train-inference mismatch: per-token weights on the policy-gradient term from
the ratio pi_old / pi_rollout of the trainer's and the rollout engine's log-probs.

Both log-probs are fixed for a rollout batch (every GRPO and SFPO pass uses the same pi_old),
so the weights are computed once per batch, on whole rows, and travel in the batch.
"""

from __future__ import annotations

import math

import torch

from sfpo_megatron.config import AlgorithmConfig


def tis_weights(log_ratio: torch.Tensor, c: float) -> torch.Tensor:
    """Truncated importance sampling: ``min(exp(log_ratio), c)`` per token."""
    return torch.exp(log_ratio).clamp(max=c)


def mis_weights(log_ratio: torch.Tensor, mask: torch.Tensor, c: float, level: str) -> torch.Tensor:
    """Masked importance sampling: 1 where the ratio lies in ``[1/c, c]``, else 0. At
    ``level="sequence"`` the ratio is the sequence's, ``prod_t pi_old / pi_rollout`` over its
    masked tokens, and every token of the sequence shares the verdict."""
    bound = math.log(c)
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(dim=-1, keepdim=True).expand_as(log_ratio)
    return (log_ratio.abs() <= bound).to(log_ratio.dtype)


def correction_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The per-token weights ``algorithm.rollout_correction`` asks for (None for ``none``;
    0 outside ``mask``) and the batch's mismatch metrics: the gap ``|log pi_old - log
    pi_rollout|`` (mean, max), the fraction of tokens truncated (tis) or masked (mis) and the
    mean weight, over the tokens of ``mask``."""
    mask = mask.bool()
    log_ratio = (old_logprobs - rollout_logprobs) * mask
    gap = log_ratio.abs()[mask]
    metrics = {
        "rollout_logprob_gap": float(gap.mean()) if gap.numel() else 0.0,
        "rollout_logprob_gap_max": float(gap.max()) if gap.numel() else 0.0,
    }
    c = cfg.rollout_correction_c
    if cfg.rollout_correction == "none":
        return None, metrics
    if cfg.rollout_correction == "tis":
        weights = tis_weights(log_ratio, c)
        metrics["rollout_truncated_frac"] = _token_mean(log_ratio > math.log(c), mask)
    else:
        weights = mis_weights(log_ratio, mask, c, cfg.rollout_correction_level)
        metrics["rollout_masked_frac"] = _token_mean(weights == 0, mask)
    weights = weights * mask
    metrics["rollout_weight_mean"] = _token_mean(weights, mask)
    return weights, metrics


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values.float()[mask].mean()) if bool(mask.any()) else 0.0
