"""Data-parallel rollout without servers (rollout/engine_group.py): engines on every rank
sample what one engine samples, and an engine that fails fails the batch on every rank."""

from __future__ import annotations

import torch
from test_hf_checkpoint import save_random_hf_model

from sfpo_megatron.rollout.engine_group import engine_rates, shares

from conftest import TESTS, small_run, torchrun


def test_shares_are_contiguous_and_balanced():
    assert shares(5, 2) == [range(0, 2), range(2, 5)]
    assert shares(1, 2) == [range(0, 0), range(0, 1)]
    assert [p for share in shares(11, 4) for p in share] == list(range(11))


def test_engine_rates():
    stats = {"time_rollout_engine0": 2.0, "rollout_tokens_engine0": 50.0, "time_rollout": 3.0}
    stats |= {"time_rollout_engine1": 0.5, "rollout_tokens_engine1": 40.0}
    assert engine_rates(stats) == {"tokens_per_s_engine0": 25.0, "tokens_per_s_engine1": 80.0}


def test_dp2_rollouts_equal_one_engine_and_failures_reach_every_rank(tmp_path):
    save_random_hf_model(tmp_path / "m", "qwen3")
    torchrun(
        2,
        TESTS / "dist" / "engine_group_worker.py",
        str(tmp_path / "r"),
        *small_run(tmp_path / "m"),
    )
    ranks = [torch.load(tmp_path / f"r.{rank}", weights_only=False) for rank in range(2)]
    assert [r["version"] for r in ranks] == [3, 3], "every engine took the synced version"
    grouped, single = ranks[0]["grouped"], ranks[0]["single"]
    assert [s.prompt_index for s in grouped] == [i for i in range(5) for _ in range(3)]
    assert [s.output_ids for s in grouped] == [s.output_ids for s in single]
    assert len({len(s.output_ids) for s in grouped}) > 2, "rows of several lengths"
    for got, expected in zip(grouped, single, strict=True):
        assert got.finish_reason == expected.finish_reason
        torch.testing.assert_close(got.output_logprobs, expected.output_logprobs, rtol=0, atol=1e-5)
    stats = ranks[0]["stats"]
    assert [stats[f"rollout_rows_engine{e}"] for e in range(2)] == [6.0, 9.0]  # 2 and 3 prompts
    tokens = sum(len(s.output_ids) for s in grouped)
    assert stats["rollout_tokens_engine0"] + stats["rollout_tokens_engine1"] == tokens
    assert stats["time_rollout_engine0"] > 0 and stats["time_rollout_engine1"] > 0
    for r in ranks:
        assert r["error"] is not None, "a rank returned from a failed batch"
        assert "engine 1: RuntimeError: injected engine failure" in r["error"]
        assert "engine 0" not in r["error"]
        assert "weight sync (version 4) failed: engine on rank 1: it serves version 2" in (
            r["sync_error"] or ""
        )
