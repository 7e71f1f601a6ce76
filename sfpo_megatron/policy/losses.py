"""Token log-probs and entropy over a vocabulary split across TP ranks, and the GRPO loss.

Pure functions of tensors (plus the TP group), unit-testable without a model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sfpo_megatron.config import AlgorithmConfig


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """log p(target) and H(p) from logits whose last dim is this rank's vocabulary slice.

    Columns at or beyond ``real_vocab`` (TP padding) are excluded from the softmax, so
    they never carry probability mass. The full vocabulary is never gathered: only
    per-token maxima and sums cross the TP group.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, real_vocab, group):
        local = logits.size(-1)
        logits = logits.float()
        padded = torch.arange(vocab_start, vocab_start + local, device=logits.device) >= real_vocab
        logits = logits.masked_fill(padded, float("-inf"))
        row_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = (logits - row_max.unsqueeze(-1)).masked_fill(padded, 0.0)
        exp = torch.exp(shifted).masked_fill(padded, 0.0)
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < local)
        picked = shifted.gather(-1, local_target.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
        sums = torch.stack([exp.sum(dim=-1), picked * owned])
        if group is not None:
            dist.all_reduce(sums, group=group)
        sum_exp, picked = sums[0], sums[1]
        probs = exp.div_(sum_exp.unsqueeze(-1))
        expected_shifted = (probs * shifted).sum(dim=-1)
        if group is not None:
            dist.all_reduce(expected_shifted, group=group)
        log_z = torch.log(sum_exp)
        logprob = picked - log_z
        entropy = log_z - expected_shifted
        ctx.save_for_backward(probs, shifted, expected_shifted, local_target, owned)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        probs, shifted, expected_shifted, local_target, owned = ctx.saved_tensors
        # d logp_t / d l_i = [i == t] - p_i ;  d H / d l_i = -p_i (l_i - E_p[l])
        grad = probs * (shifted - expected_shifted.unsqueeze(-1))
        grad.mul_(-grad_entropy.unsqueeze(-1))
        grad.sub_(probs * grad_logprob.unsqueeze(-1))
        onehot_index = local_target.clamp(0, probs.size(-1) - 1).unsqueeze(-1)
        grad.scatter_add_(-1, onehot_index, (grad_logprob * owned).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    real_vocab: int,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` and entropy, in fp32, differentiable w.r.t. logits.

    ``logits[..., v]`` is the logit of global token ``vocab_start + v``; ``group`` is the
    TP group the vocabulary is split over (None or size 1: the whole vocabulary is local).
    """
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return _VocabParallelLogprobEntropy.apply(logits, targets, vocab_start, real_vocab, group)


LOSS_STATS = ("pg_loss", "clip_frac", "approx_kl", "entropy", "ref_kl")
"""Per-token statistics the loss reports (summed over tokens; divide by the token count)."""


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    cfg: AlgorithmConfig,
    ref_logprobs: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``w max(-A r, -A clip(r, 1-eps_low, 1+eps_high)) - c_H H (+ beta KL)``.

    All arguments share one shape; the caller masks and aggregates (token-mean). ``w`` is the
    rollout-correction weight of :mod:`~sfpo_megatron.policy.rollout_correction` (None: 1).
    Returns the loss and the per-token statistics named in :data:`LOSS_STATS` (detached).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    if rollout_weights is not None:
        pg = rollout_weights * pg
    loss = pg - cfg.entropy_coef * entropy
    ref_kl = torch.zeros_like(loss)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs reference log-probs in the batch")
        ref_kl = low_variance_kl(logprobs, ref_logprobs)
        loss = loss + cfg.kl_coef * ref_kl
    stats = {
        "pg_loss": pg.detach(),
        "clip_frac": (clipped > unclipped).float(),
        "approx_kl": low_variance_kl(logprobs, old_logprobs).detach(),
        "entropy": entropy.detach(),
        "ref_kl": ref_kl.detach(),
    }
    return loss, stats


def low_variance_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, clamped like verl."""
    delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1.0).clamp(-10.0, 10.0)
