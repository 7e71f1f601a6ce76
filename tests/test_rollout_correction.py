"""Rollout correction (TIS, MIS): weights against the formulas on hand-made ratios, and how they
enter the GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import stable_metrics, train

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import AlgorithmConfig
from sfpo_megatron.policy.losses import grpo_token_loss
from sfpo_megatron.policy.rollout_correction import correction_weights

# Two rows; row 0 has 4 response tokens, row 1 has 3 (its last column is padding).
RATIOS = torch.tensor([[1.0, 3.0, 0.25, 1.5], [0.8, 1.9, 0.6, 7.0]])
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])
ROLLOUT = torch.log(torch.tensor([[0.5, 0.1, 0.8, 0.3], [0.2, 0.4, 0.5, 0.9]]))
OLD = ROLLOUT + torch.log(RATIOS)


def _weights(kind: str, c: float, level: str = "token"):
    cfg = AlgorithmConfig(
        rollout_correction=kind, rollout_correction_c=c, rollout_correction_level=level
    )
    return correction_weights(OLD, ROLLOUT, MASK, cfg)


def test_tis_weights_are_truncated_ratios():
    weights, metrics = _weights("tis", 2.0)
    expected = torch.tensor([[1.0, 2.0, 0.25, 1.5], [0.8, 1.9, 0.6, 0.0]])
    torch.testing.assert_close(weights, expected)
    assert metrics["rollout_truncated_frac"] == pytest.approx(1 / 7)
    assert metrics["rollout_weight_mean"] == pytest.approx(float(expected.sum()) / 7)
    gaps = torch.log(RATIOS).abs()[MASK]
    assert metrics["rollout_logprob_gap"] == pytest.approx(float(gaps.mean()), rel=1e-6)
    assert metrics["rollout_logprob_gap_max"] == pytest.approx(math.log(4), rel=1e-6)


def test_mis_token_level_masks_ratios_outside_the_band():
    weights, metrics = _weights("mis", 2.0)
    # 3.0 > 2 and 0.25 < 1/2 are masked; 1.9, 0.6 and 1.5 are inside; padding weighs 0.
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(weights, expected)
    assert metrics["rollout_masked_frac"] == pytest.approx(2 / 7)
    assert metrics["rollout_weight_mean"] == pytest.approx(5 / 7)


def test_mis_sequence_level_judges_the_product_of_ratios():
    # Row 0: 1 * 3 * 0.25 * 1.5 = 1.125, inside [1/2, 2]. Row 1: 0.8 * 1.9 * 0.6 = 0.912
    # (the padded 7.0 does not count), inside too; with C = 1.1 only row 1 is.
    weights, _ = _weights("mis", 2.0, "sequence")
    assert torch.equal(weights, MASK.float())
    weights, metrics = _weights("mis", 1.1, "sequence")
    assert torch.equal(weights, torch.tensor([[0.0] * 4, [1.0, 1.0, 1.0, 0.0]]))
    assert metrics["rollout_masked_frac"] == pytest.approx(4 / 7)


def test_none_gives_no_weights_but_the_gap_metrics():
    weights, metrics = _weights("none", 2.0)
    assert weights is None
    assert set(metrics) == {"rollout_logprob_gap", "rollout_logprob_gap_max"}


def _loss(weights=None, cfg=None):
    g = torch.Generator().manual_seed(0)
    logprobs, adv, ent = (torch.randn(2, 4, generator=g) for _ in range(3))
    return grpo_token_loss(logprobs, OLD, adv, ent, cfg or AlgorithmConfig(), None, weights)


def test_tis_with_infinite_c_is_untruncated_importance_sampling():
    weights, metrics = _weights("tis", math.inf)
    assert torch.equal(weights, torch.exp(OLD - ROLLOUT) * MASK)
    assert metrics["rollout_truncated_frac"] == 0.0
    cfg = AlgorithmConfig(entropy_coef=0.0)
    loss, _ = _loss(weights, cfg)
    plain_loss, _ = _loss(None, cfg)
    assert torch.equal(loss, weights * plain_loss)


def test_tis_without_mismatch_is_exactly_the_uncorrected_loss():
    cfg = AlgorithmConfig(rollout_correction="tis", rollout_correction_c=math.inf)
    weights, _ = correction_weights(OLD, OLD.clone(), MASK, cfg)
    assert torch.equal(weights, MASK.float())
    loss, _ = _loss(weights)
    plain_loss, _ = _loss()
    assert torch.equal(loss[MASK], plain_loss[MASK])


def test_mis_weights_remove_the_policy_gradient_of_masked_tokens():
    weights, _ = _weights("mis", 2.0)
    cfg = AlgorithmConfig(entropy_coef=0.0)
    loss, _ = _loss(weights, cfg)
    plain_loss, _ = _loss(None, cfg)
    assert torch.equal(loss[weights == 0], torch.zeros(3))
    assert torch.equal(loss[weights == 1], plain_loss[weights == 1])


def test_c_must_exceed_one():
    with pytest.raises(ConfigError, match="algorithm.rollout_correction_c"):
        AlgorithmConfig(rollout_correction="tis", rollout_correction_c=1.0).validate()


def test_fp8_rollouts_with_tis_train_end_to_end(tmp_path):
    """The embedded engine samples from fp8 weights; the gap to the actor is now real, and TIS
    weights it in every SFPO pass."""
    train(
        tmp_path,
        ranks=1,
        **{
            "train.iterations": 2,
            "eval.interval": 0,
            "checkpoint.dir": "null",
            "checkpoint.interval": 0,
            "checkpoint.export_hf_dir": "null",
            "rollout.weight_format": "fp8",
            "algorithm.rollout_correction": "tis",
            "algorithm.rollout_correction_c": 1.002,
        },
    )
    for row in stable_metrics(tmp_path).values():
        assert 1e-4 < row["rollout_logprob_gap"] <= row["rollout_logprob_gap_max"] < 1.0, row
        assert 0 < row["rollout_truncated_frac"] < 1, row
        assert 0 < row["rollout_weight_mean"] < 1.002, row
