"""One SFPO iteration (K = 3, alpha = 0.8, 2 mini-batches per pass: 8 AdamW steps) on the
Megatron actor against the spec's formula in plain PyTorch (tests/reference.py), under
TP/PP/DP layouts, distributed optimizer on and off, snapshot on device and on host."""

from __future__ import annotations

import pytest
from layouts import SFPO_BF16, SFPO_FP32, K, assert_matches_reference, assert_within_bf16


@pytest.mark.parametrize("layout", list(SFPO_FP32))
def test_sfpo_iteration_matches_reference_fp32(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_matches_reference(model, got, algorithm)
    assert got["metrics"]["fast_optimizer_steps"] == 2 * K
    assert got["metrics"]["optimizer_steps"] == 2  # the slow pass


@pytest.mark.parametrize("layout", list(SFPO_BF16))
def test_sfpo_iteration_bf16_within_rounding(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_within_bf16(model, got, algorithm, adam_steps=2 * (K + 1))
