"""How the actor cuts a batch into micro-batches (sfpo_megatron/policy/micro_batches.py):
token-budget packing balanced over data-parallel ranks, the packed row's inputs, and the
padded cut kept for comparison. The numerics of packed vs padded training are checked
under every layout in test_actor_layouts.py."""

from __future__ import annotations

import random

import pytest
import torch

from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.policy.micro_batches import (
    Geometry,
    packed_groups,
    padded_groups,
    plan_micro_batches,
    real_lengths,
)

CPU = torch.device("cpu")


def _batch(lengths: list[int], prompt: int = 2, width: int | None = None) -> PolicyBatch:
    """Rows of ``lengths`` real tokens (``prompt`` of them prompt), right-padded with -1s
    that must never reach a packed micro-batch."""
    width = width or max(lengths) + 3
    tokens = torch.full((len(lengths), width), -1)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.arange(n) + 100 * i
        mask[i, prompt:n] = True
    advantages = torch.arange(len(lengths), dtype=torch.float) + 1
    old = torch.where(mask, -tokens.float(), torch.zeros(()))
    return PolicyBatch(tokens, mask, advantages=advantages, old_logprobs=old)


def _geometry(**overrides) -> Geometry:
    args = dict(
        packing=True,
        token_budget=32,
        micro_batch_size=1,
        data_parallel=1,
        data_parallel_rank=0,
        sequence_multiple=1,
        pipelined=False,
        micro_batch_multiple=1,
    )
    return Geometry(**{**args, **overrides})


def test_real_lengths_end_at_the_last_response_token():
    batch = _batch([5, 9, 3])
    batch.response_mask[1, 6:] = False  # trailing tokens no loss and no output reads
    batch.response_mask[2, :] = False
    assert real_lengths(batch) == [5, 6, 0]


@pytest.mark.parametrize("ranks, multiple", [(1, 1), (2, 1), (4, 1), (2, 2), (3, 2)])
def test_packed_groups_cover_every_row_once_within_budget(ranks, multiple):
    rng = random.Random(ranks * 10 + multiple)
    lengths = [rng.choice([rng.randint(3, 12), 40]) for _ in range(37)] + [0, 0]
    groups = packed_groups(lengths, budget=48, ranks=ranks, multiple_of=multiple)
    assert len(groups) == ranks
    counts = {len(g) for g in groups}
    assert len(counts) == 1 and counts.pop() % multiple == 0  # every rank, same count
    rows = sorted(r for g in groups for mb in g for r in mb)
    assert rows == [i for i, n in enumerate(lengths) if n > 0]
    assert all(sum(lengths[r] for r in mb) <= 48 for g in groups for mb in g)
    totals = [sum(lengths[r] for mb in g for r in mb) for g in groups]
    assert max(totals) - min(totals) <= max(lengths)  # greedy balance by tokens


def test_packed_groups_use_few_micro_batches():
    """Short rows fill micro-batches: 16 rows of 8 tokens, budget 32 -> 4 micro-batches."""
    groups = packed_groups([8] * 16, budget=32, ranks=1)
    assert [len(mb) for mb in groups[0]] == [4, 4, 4, 4]


def test_packed_groups_refuse_a_sequence_over_budget():
    with pytest.raises(ValueError, match="33 tokens exceeds train.max_tokens_per_micro_batch=32"):
        packed_groups([10, 33], budget=32, ranks=1)


def test_padded_groups_are_consecutive_rows_per_rank():
    assert padded_groups(8, 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_packed_micro_batch_inputs():
    """Sequences end to end; positions restart; targets and per-token inputs are each
    sequence's own, shifted; a masked tail sequence pads to the width."""
    batch = _batch([5, 4], prompt=2)
    plan = plan_micro_batches(batch, _geometry(sequence_multiple=4), CPU)
    (mb,) = plan.micro_batches
    x = mb.inputs
    assert x["tokens"][0].tolist() == [0, 1, 2, 3, 4, 100, 101, 102, 103, 0, 0, 0]
    assert x["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    params = x["packed_seq_params"]
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 9, 12] and params.max_seqlen_q == 5
    # position t predicts token t + 1 of its own sequence; the last position of each is masked
    assert x["targets"][0, :9].tolist() == [1, 2, 3, 4, -1, 101, 102, 103, -1]
    assert x["mask"][0].tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert x["advantages"][0, :9].tolist() == [1.0] * 5 + [2.0] * 4
    assert x["old_logprobs"][0, :9].tolist() == [0, -2, -3, -4, 0, 0, -102, -103, 0]
    assert [(s.row, s.start, s.length) for s in mb.segments] == [(0, 0, 5), (1, 5, 4)]
    assert plan.processed_tokens == 12 and plan.seq_length == 12 and plan.micro_batch_size == 1


def test_pipelined_packs_share_one_width():
    batch = _batch([20, 6, 5, 30])
    plan = plan_micro_batches(batch, _geometry(pipelined=True, sequence_multiple=2), CPU)
    widths = {mb.inputs["tokens"].shape for mb in plan.micro_batches}
    assert widths == {(1, 32)} and plan.seq_length == 32  # [30] and [20, 6, 5] -> 31 -> 32


def test_every_rank_builds_only_its_own_micro_batches():
    batch = _batch([9, 3, 7, 5, 4, 8])
    plans = [
        plan_micro_batches(batch, _geometry(data_parallel=2, data_parallel_rank=r), CPU)
        for r in range(2)
    ]
    assert plans[0].groups == plans[1].groups
    for rank, plan in enumerate(plans):
        rows = [s.row for mb in plan.micro_batches for s in mb.segments]
        assert rows == [r for mb in plan.groups[rank] for r in mb]
    assert len(plans[0].micro_batches) == len(plans[1].micro_batches)


def test_padded_plan_is_the_old_cut():
    batch = _batch([9, 3, 7, 5])
    plan = plan_micro_batches(
        batch, _geometry(packing=False, micro_batch_size=2, sequence_multiple=4), CPU
    )
    assert [mb.inputs["tokens"].shape for mb in plan.micro_batches] == [(2, 12), (2, 12)]
    assert plan.seq_length == 12 and plan.micro_batch_size == 2
    assert plan.lengths == [12] * 4
    with pytest.raises(ValueError, match="micro_batch_size x data-parallel size = 6"):
        plan_micro_batches(
            batch, _geometry(packing=False, micro_batch_size=3, data_parallel=2), CPU
        )
