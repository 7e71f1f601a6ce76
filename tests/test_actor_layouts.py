"""The Megatron actor's GRPO training pass against the single-process plain-PyTorch reference
(tests/reference.py) under every parallel layout: log-probs, entropy, and all parameters after
one pass. Layouts and tolerances: tests/layouts.py."""

from __future__ import annotations

import pytest
from layouts import (
    GRPO_BF16,
    GRPO_FP32,
    PACKING_CHECKED,
    assert_matches_reference,
    assert_within_bf16,
    rel_err,
)


@pytest.mark.parametrize("layout", list(GRPO_FP32))
def test_grpo_pass_matches_reference_fp32(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_matches_reference(model, got, algorithm)
    assert got["metrics"]["optimizer_steps"] == 2


@pytest.mark.parametrize("layout", list(GRPO_BF16))
def test_grpo_pass_bf16_within_rounding(layout_runs, layout):
    model, got, algorithm = layout_runs[layout]
    assert_within_bf16(model, got, algorithm, adam_steps=1)


@pytest.mark.parametrize("algorithm", ["grpo", "sfpo"])
@pytest.mark.parametrize("layout", PACKING_CHECKED)
def test_packed_equals_padded(layout_runs, layout, algorithm):
    """The same batch packed (several sequences per micro-batch) and padded: the same
    log-probs, entropy and parameters after one GRPO pass or one SFPO iteration, to 1e-6
    of their largest magnitude (a few fp32 roundings: TP and DP reduce in other orders)."""
    name = layout if algorithm == "grpo" else f"sfpo_{layout}"
    _, packed, _ = layout_runs[name]
    _, padded, _ = layout_runs[f"{name}_padded"]
    assert rel_err(packed["logprobs"], padded["logprobs"]) <= 1e-6
    assert rel_err(packed["entropy"], padded["entropy"]) <= 1e-6
    assert packed["metrics"]["tokens"] == padded["metrics"]["tokens"]
    assert packed["metrics"]["processed_tokens"] <= padded["metrics"]["processed_tokens"]
    for param, value in padded["state"].items():
        assert rel_err(packed["state"][param], value) <= 1e-6, param
