"""The embedded engine, loaded from the Megatron actor through the export stream (TP2, PP2),
samples tokens whose log-probs the actor reproduces (fp32 on CPU, 1e-4)."""

from __future__ import annotations

import pytest
import torch
from test_hf_checkpoint import save_random_hf_model

from conftest import TESTS, small_run, torchrun


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"]])
def test_rollout_logprobs_equal_actor_logprobs(tmp_path, layout):
    save_random_hf_model(tmp_path / "m", "qwen3")
    torchrun(
        2,
        TESTS / "dist" / "rollout_worker.py",
        str(tmp_path / "r.pt"),
        *small_run(tmp_path / "m", micro_batch_size=4),
        *layout,
    )
    r = torch.load(tmp_path / "r.pt")
    assert r["versions"] == [1] and r["engine_version"] == 1
    assert r["mask"].shape[0] == 8 and r["mask"].sum(dim=1).min() >= 1  # 4 prompts x n=2
    diff = (r["engine"] - r["actor"])[r["mask"]].abs().max().item()
    assert diff < 1e-4, diff
