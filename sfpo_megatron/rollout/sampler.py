"""Token draws that depend on the row, not on the batch: every row (seed, prompt index, sample
index) has its own key, and its t-th draw uses a uniform number hashed from (key, t). So a
row gets the same tokens whatever slot, batch, order or engine decodes it, and a resumed run
(the same seeds) draws the same samples. The hash is integer arithmetic on device tensors,
one value per row and step, with no generator state to carry between steps."""

from __future__ import annotations

import torch

from sfpo_megatron.common.samples import SamplingParams

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24
"""Bits of each uniform number: a float32 mantissa, as fine as the fp32 CDF it is compared to."""


def _mix32(x):
    """Chris Wellons' lowbias32 finaliser on the low 32 bits of ``x`` (Python int or int64
    tensor; in a tensor a product may wrap, which leaves its low 32 bits intact)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 32-bit key of one row's draws."""
    key = _mix32(seed ^ _mix32(seed >> 32))
    key = _mix32(key ^ _mix32(prompt_index + 0x9E3779B9))
    return _mix32(key ^ _mix32(sample_index + 0x7F4A7C15))


def uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1] per row: the draw ``counters`` of the row with key ``keys``."""
    bits = _mix32(keys ^ _mix32(counters + 0x632BE5AB)) >> (32 - _UNIFORM_BITS)
    return (bits + 1).float() / 2**_UNIFORM_BITS


def sample_token(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``logits`` [batch, vocab]: temperature, then top-k, then top-p,
    then the token where the row's CDF reaches ``uniform`` [batch] (values in (0, 1]). The
    log-prob returned is over the full vocabulary (before truncation), in fp32, as the actor
    computes it."""
    scaled = logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.shape[-1]:
        top = scaled.topk(params.top_k, dim=-1).indices
        keep = torch.zeros_like(keep).scatter_(-1, top, True)
    if params.top_p < 1:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token is dropped when the more likely ones already reach top_p (never the first).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        keep &= ~torch.zeros_like(keep).scatter_(-1, order, drop_sorted)
    cdf = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1).cumsum(-1)
    # The first token whose CDF reaches the target: it has positive probability (target > 0).
    target = uniform[:, None] * cdf[:, -1:]
    token = (cdf < target).sum(-1).clamp_(max=scaled.shape[-1] - 1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
