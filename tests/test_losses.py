"""Vocab-parallel log-prob/entropy and the GRPO loss against direct formulas."""

from __future__ import annotations

import pytest
import torch

from sfpo_megatron.config import AlgorithmConfig
from sfpo_megatron.policy.losses import (
    grpo_token_loss,
    low_variance_kl,
    vocab_parallel_logprob_entropy,
)


def naive(logits, targets, real_vocab):
    logp = torch.log_softmax(logits[..., :real_vocab], dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("padding", [0, 5])
def test_logprob_entropy_values_and_gradients(padding):
    g = torch.Generator().manual_seed(0)
    vocab = 37
    logits = (torch.randn(3, 7, vocab + padding, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    weights = torch.randn(2, 3, 7, generator=g)

    lp, ent = vocab_parallel_logprob_entropy(logits, targets, 0, vocab)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_lp, ref_ent = naive(ref_logits, targets, vocab)
    ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()

    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    if padding:  # padded columns carry no probability, hence no gradient
        assert grad[..., vocab:].abs().max() == 0


def test_padding_rows_never_carry_mass():
    logits = torch.zeros(1, 1, 8)
    logits[..., 6:] = 100.0  # huge logits on padding columns 6, 7
    lp, ent = vocab_parallel_logprob_entropy(logits, torch.tensor([[2]]), 0, 6)
    assert torch.allclose(lp, torch.log(torch.tensor(1 / 6)))
    assert torch.allclose(ent, torch.log(torch.tensor(6.0)))


def test_grpo_loss_clipping_and_terms():
    cfg = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28, entropy_coef=0.01, kl_coef=0.0)
    old = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    ent = torch.tensor([2.0, 2.0, 2.0, 2.0])
    loss, stats = grpo_token_loss(logprobs, old, adv, ent, cfg)
    # ratio 1.5, A>0: clipped at 1.28 -> -1.28. ratio 0.5, A<0: clipped at 0.8 -> 0.8.
    # ratio 1.1, A<0: inside -> 1.1. ratio 0.7, A>0: max(-0.7, -0.8) = -0.7 (unclipped).
    expected_pg = torch.tensor([-1.28, 0.8, 1.1, -0.7])
    torch.testing.assert_close(stats["pg_loss"], expected_pg)
    torch.testing.assert_close(loss, expected_pg - 0.01 * 2.0)
    assert stats["clip_frac"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_kl_term_needs_reference_and_is_added():
    cfg = AlgorithmConfig(kl_coef=0.5, entropy_coef=0.0)
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    with pytest.raises(ValueError, match="reference log-probs"):
        grpo_token_loss(lp, lp, torch.ones(2), torch.zeros(2), cfg)
    loss, stats = grpo_token_loss(lp, lp, torch.ones(2), torch.zeros(2), cfg, ref)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(stats["ref_kl"], k3)
    torch.testing.assert_close(loss, -torch.ones(2) + 0.5 * k3)
    assert (low_variance_kl(lp, ref) >= 0).all()
