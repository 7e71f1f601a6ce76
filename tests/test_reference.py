"""The KL reference policy (pinned host copy swapped in for its forward) under TP2 and PP2."""

from __future__ import annotations

import json

import pytest

from conftest import TESTS, torchrun, write_hf_config


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"]])
def test_reference_policy_keeps_the_initial_weights(tmp_path, layout):
    model = write_hf_config(tmp_path / "model", "qwen2")
    report = tmp_path / "report.json"
    torchrun(
        2,
        TESTS / "dist" / "reference_worker.py",
        str(report),
        f"model.hf_config={model}",
        "model.load_weights=false",
        "model.dtype=fp32",
        "train.prompts_per_step=4",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=4",
        "train.micro_batch_size=4",
        "optimizer.lr=1e-2",
        *layout,
    )
    assert json.loads(report.read_text()) == {
        "reference_is_initial": True,
        "actor_unchanged_by_swap": True,
        "training_changed_logprobs": True,
    }
