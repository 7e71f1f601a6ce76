"""The Megatron actor's GRPO training pass against the single-process plain-PyTorch reference
(tests/reference.py) under every parallel layout: log-probs, entropy, and all parameters after
one pass. Layouts and tolerances: tests/layouts.py."""

from __future__ import annotations

import pytest
from layouts import GRPO_BF16, GRPO_FP32, assert_matches_reference, assert_within_bf16


@pytest.mark.parametrize("layout", list(GRPO_FP32))
def test_grpo_pass_matches_reference_fp32(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_matches_reference(model, got, algorithm)
    assert got["metrics"]["optimizer_steps"] == 2


@pytest.mark.parametrize("layout", list(GRPO_BF16))
def test_grpo_pass_bf16_within_rounding(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_within_bf16(model, got, algorithm, adam_steps=1)
