"""How the actor cuts a batch into micro-batches.

Packed (``train.packing: true``): each micro-batch is one row of whole sequences laid end
to end (Megatron's THD format: attention stays within a sequence, positions restart), under
a token budget, and the rows are spread over data-parallel ranks by tokens. Padded: each
micro-batch is ``train.micro_batch_size`` rows, each as long as the batch's longest row.

Either way a row's per-token values come back through :meth:`MicroBatch.segments`: where
each of its tokens sits in the micro-batch's flattened ``[b * s]`` outputs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from sfpo_megatron.policy.batch import PolicyBatch

PER_TOKEN_FIELDS = ("old_logprobs", "ref_logprobs", "rollout_weights")
"""Per-token inputs of the loss besides tokens and mask, shifted like the targets."""


@dataclass(frozen=True)
class Segment:
    """``length`` tokens of batch row ``row``, from flat offset ``start`` of a micro-batch."""

    row: int
    start: int
    length: int


@dataclass
class MicroBatch:
    inputs: dict
    """What the forward step and the loss read (see :func:`_row_inputs`)."""
    segments: list[Segment]

    @property
    def processed_tokens(self) -> int:
        return self.inputs["tokens"].numel()


def real_lengths(batch: PolicyBatch) -> list[int]:
    """Tokens of each row that matter: up to its last response token (the rest is padding
    or context nothing reads; a row without response tokens needs none)."""
    mask = batch.response_mask.bool()
    positions = torch.arange(1, batch.seq_length + 1).expand_as(mask)
    return (positions * mask).amax(dim=1).tolist()


def spread_over_ranks(lengths: list[int], ranks: int) -> list[list[int]]:
    """Rows per data-parallel rank with token totals as even as greedy allows: longest row
    first, each onto the rank with the fewest tokens so far (rows without tokens skipped)."""
    rows = [row for row, n in enumerate(lengths) if n > 0]
    return _fill(rows, lengths, ranks, math.inf)


def _fill(rows: list[int], lengths: list[int], bins: int, budget: float) -> list[list[int]] | None:
    """``rows`` in ``bins`` bins of at most ``budget`` tokens, longest first onto the
    lightest bin; None when a row does not fit there."""
    heap = [(0, index) for index in range(bins)]  # (tokens, bin): a heap as it stands
    out: list[list[int]] = [[] for _ in range(bins)]
    for row in sorted(rows, key=lambda i: (-lengths[i], i)):
        load, index = heapq.heappop(heap)
        if load + lengths[row] > budget:
            return None
        out[index].append(row)
        heapq.heappush(heap, (load + lengths[row], index))
    return [sorted(b) for b in out]


def packed_groups(
    lengths: list[int], budget: int, ranks: int, multiple_of: int = 1
) -> list[list[list[int]]]:
    """``[rank][micro-batch] -> rows``: every rank runs the same number of micro-batches
    (a multiple of ``multiple_of``), none over ``budget`` tokens, each rank's tokens spread
    evenly over them."""
    too_long = [n for n in lengths if n > budget]
    if too_long:
        raise ValueError(
            f"a sequence of {max(too_long)} tokens exceeds train.max_tokens_per_micro_batch="
            f"{budget}"
        )
    per_rank = spread_over_ranks(lengths, ranks)
    heaviest = max(sum(lengths[r] for r in rows) for rows in per_rank)
    count = max(math.ceil(heaviest / budget), 1)
    while True:
        count = math.ceil(count / multiple_of) * multiple_of
        filled = [_fill(rows, lengths, count, budget) for rows in per_rank]
        if all(f is not None for f in filled):
            return filled
        count += 1


def padded_groups(rows: int, micro_batch_size: int, ranks: int) -> list[list[list[int]]]:
    """``[rank][micro-batch] -> rows``: consecutive rows, an equal share per rank."""
    per_rank = rows // ranks
    return [
        [
            list(range(start, min(start + micro_batch_size, (rank + 1) * per_rank)))
            for start in range(rank * per_rank, (rank + 1) * per_rank, micro_batch_size)
        ]
        for rank in range(ranks)
    ]


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """Column t of the result holds column t + 1 of ``x`` (the token position t predicts)."""
    return torch.nn.functional.pad(x[:, 1:], (0, 1))


def _row_inputs(batch: PolicyBatch, rows: list[int]) -> dict[str, torch.Tensor]:
    """The rows' tokens and per-target tensors, shifted so column t is what t predicts."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = _shift_left(batch.response_mask[index]).float()
    inputs = {
        "tokens": batch.tokens[index],
        "targets": _shift_left(batch.tokens[index]),
        "mask": mask,
    }
    if batch.advantages is not None:
        inputs["advantages"] = batch.advantages[index].float().unsqueeze(1).expand_as(mask)
    for name in PER_TOKEN_FIELDS:
        value = getattr(batch, name)
        if value is not None:
            inputs[name] = _shift_left(value[index].float())
    return inputs


def padded_micro_batch(batch: PolicyBatch, rows: list[int], device: torch.device) -> MicroBatch:
    """``rows`` as a ``[len(rows), S]`` micro-batch, each row padded to the batch's width."""
    inputs = {k: v.to(device) for k, v in _row_inputs(batch, rows).items()}
    width = batch.seq_length
    positions = torch.arange(width, device=device).expand(len(rows), -1)
    inputs["position_ids"] = positions
    segments = [Segment(row, i * width, width) for i, row in enumerate(rows)]
    return MicroBatch(inputs, segments)


def packed_micro_batch(
    batch: PolicyBatch,
    rows: list[int],
    lengths: list[int],
    width: int,
    device: torch.device,
) -> MicroBatch:
    """``rows`` end to end in one ``[1, width]`` row; the tokens after the last sequence
    form one more (masked) sequence of their own so no real sequence attends to them."""
    whole = _row_inputs(batch, rows)
    pieces = {name: [value.reshape(-1)[:0]] for name, value in whole.items()}
    segments, start = [], 0
    for i, row in enumerate(rows):
        for name, value in whole.items():
            pieces[name].append(value[i, : lengths[row]])
        segments.append(Segment(row, start, lengths[row]))
        start += lengths[row]
    seqlens = [s.length for s in segments] + ([width - start] if width > start else [])
    inputs = {
        name: torch.nn.functional.pad(torch.cat(parts), (0, width - start)).unsqueeze(0)
        for name, parts in pieces.items()
    }
    inputs = {name: value.to(device) for name, value in inputs.items()}
    inputs["position_ids"] = torch.cat([torch.arange(n) for n in seqlens]).unsqueeze(0).to(device)
    cu_seqlens = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_seqlens = cu_seqlens.to(device)
    inputs["packed_seq_params"] = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max(seqlens),
        max_seqlen_kv=max(seqlens),
    )
    return MicroBatch(inputs, segments)


@dataclass
class Plan:
    """One batch's micro-batches on every data-parallel rank."""

    groups: list[list[list[int]]]
    """``[rank][micro-batch] -> rows``."""
    lengths: list[int]
    """Per row: how many of its tokens the micro-batch outputs carry (from token 0)."""
    micro_batches: list[MicroBatch]
    """This rank's."""
    seq_length: int
    """The schedule's sequence length (the pipeline's activation shape)."""
    micro_batch_size: int

    @property
    def processed_tokens(self) -> int:
        """Tokens this rank runs through the model, padding included."""
        return sum(mb.processed_tokens for mb in self.micro_batches)


@dataclass(frozen=True)
class Geometry:
    """What the cut depends on besides the batch: the config and the layout."""

    packing: bool
    token_budget: int
    micro_batch_size: int
    data_parallel: int
    data_parallel_rank: int
    sequence_multiple: int
    """Tokens per row must be a multiple of this (sequence parallelism: the TP size)."""
    pipelined: bool
    """True: every micro-batch has one shape (pipeline stages exchange fixed shapes)."""
    micro_batch_multiple: int
    """Micro-batches per rank must be a multiple of this (the interleaved schedule: PP)."""


def plan_micro_batches(batch: PolicyBatch, geometry: Geometry, device: torch.device) -> Plan:
    """Cut ``batch`` for this rank (``geometry.data_parallel_rank``)."""
    g = geometry
    if not g.packing:
        return _padded_plan(batch, g, device)
    lengths = real_lengths(batch)
    groups = packed_groups(lengths, g.token_budget, g.data_parallel, g.micro_batch_multiple)
    mine = groups[g.data_parallel_rank]

    def width(rows: list[int]) -> int:
        tokens = max(sum(lengths[r] for r in rows), 1)
        return math.ceil(tokens / g.sequence_multiple) * g.sequence_multiple

    widths = [width(rows) for rows in mine]
    if g.pipelined:
        widths = [max(widths)] * len(widths)
    micro_batches = [
        packed_micro_batch(batch, rows, lengths, w, device)
        for rows, w in zip(mine, widths, strict=True)
    ]
    return Plan(groups, lengths, micro_batches, max(widths), 1)


def _padded_plan(batch: PolicyBatch, g: Geometry, device: torch.device) -> Plan:
    rows_multiple = g.micro_batch_size * g.data_parallel
    if batch.num_sequences % rows_multiple:
        raise ValueError(
            f"a batch of {batch.num_sequences} sequences does not split into "
            f"train.micro_batch_size x data-parallel size = {rows_multiple}"
        )
    padded = batch.padded_to(g.sequence_multiple)
    groups = padded_groups(batch.num_sequences, g.micro_batch_size, g.data_parallel)
    micro_batches = [
        padded_micro_batch(padded, rows, device) for rows in groups[g.data_parallel_rank]
    ]
    lengths = [padded.seq_length] * batch.num_sequences
    return Plan(groups, lengths, micro_batches, padded.seq_length, g.micro_batch_size)
