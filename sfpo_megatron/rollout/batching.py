"""Which rows the embedded engine decodes when: a pool of KV-cache slots
(:class:`~sfpo_megatron.rollout.decoder.SlotDecoder`) and a queue of rows.

- continuous (the default): a row that is done frees its slot at the next check and the next
  waiting prompt is prefilled into it, so a long-tail batch costs about its total tokens, not
  rows x longest response; once nothing waits, the rows left move into the first half of the
  slots whenever they fit there, so the tail's steps get narrower.
- static (the baseline of ``benchmarks/bench_generate.py``): the pool is refilled only when
  every row in it is done, so each group of rows runs as long as its longest row.

A row's tokens depend only on its own key (:mod:`~sfpo_megatron.rollout.sampler`), so both
modes, any slot count and any order give the same samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.rollout.decoder import SlotDecoder
from sfpo_megatron.rollout.sampler import sample_token, uniforms

STOP_CHECK_STEPS = 16
"""Decode steps between checks for rows that are done (each check waits for the device)."""


@dataclass(frozen=True)
class Row:
    """One sequence to generate: its prompt, the key of its draws and its token budget."""

    prompt: list[int]
    key: int
    budget: int


@dataclass
class Decoded:
    tokens: list[int]
    logprobs: list[float]
    """log_softmax(logits / temperature) of each token, fp32."""
    stopped: bool
    """A stop token ended the row (else its budget did)."""


class _Slots:
    """The sampling state of every slot, on the device (row ``s`` = slot ``s``)."""

    def __init__(self, slots: int, budget: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.key, self.count, self.budget, self.last = (zeros(slots) for _ in range(4))
        self.done, self.stopped = zeros(slots, dtype=torch.bool), zeros(slots, dtype=torch.bool)
        # One spare column: a done row keeps writing (unused) draws at index = its length.
        self.tokens = zeros(slots, budget + 1)
        self.logprobs = zeros(slots, budget + 1, dtype=torch.float32)

    def tensors(self) -> list[torch.Tensor]:
        return [self.key, self.count, self.budget, self.last, self.done, self.stopped,
                self.tokens, self.logprobs]  # fmt: skip

    def admit(self, slots: list[int], rows: list[Row]) -> None:
        index = torch.tensor(slots, device=self.key.device)
        self.key.index_copy_(0, index, torch.tensor([r.key for r in rows], device=index.device))
        budgets = torch.tensor([r.budget for r in rows], device=index.device)
        self.budget.index_copy_(0, index, budgets)
        for tensor in (self.count, self.done, self.stopped):
            tensor.index_fill_(0, index, 0)

    def draw(self, logits: torch.Tensor, params: SamplingParams, stops: torch.Tensor) -> None:
        """Sample each slot's next token, record it, and mark rows a stop token or their
        budget ended (a row already done draws on, unrecorded)."""
        width = len(logits)
        count, done = self.count[:width], self.done[:width]
        token, logprob = sample_token(logits, params, uniforms(self.key[:width], count))
        self.tokens[:width].scatter_(1, count[:, None], token[:, None])
        self.logprobs[:width].scatter_(1, count[:, None], logprob[:, None])
        hit = ~done & torch.isin(token, stops)
        self.stopped[:width] |= hit
        count += ~done
        done |= hit | (count >= self.budget[:width])
        self.last[:width] = token


def decode_rows(
    decoder: SlotDecoder,
    rows: list[Row],
    params: SamplingParams,
    slots: int,
    continuous: bool = True,
) -> list[Decoded]:
    """Generate every row with a pool of ``slots`` slots; results in row order. ``params``
    gives the sampling (not the budgets or seeds: those are the rows')."""
    device = decoder.device
    slots = min(slots, len(rows))
    decoder.reserve(slots, max(len(r.prompt) + r.budget for r in rows))
    state = _Slots(slots, max(r.budget for r in rows), device)
    stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
    waiting = deque(range(len(rows)))
    row_of: list[int | None] = [None] * slots
    clock = 0
    """Draws so far; a row admitted at ``admitted[s]`` has at most ``clock - admitted[s]``."""
    admitted = [0] * slots
    results: list[Decoded | None] = [None] * len(rows)

    def admit() -> None:
        free = [s for s in range(decoder.width) if row_of[s] is None][: len(waiting)]
        if not free:
            return
        taken = [waiting.popleft() for _ in free]
        decoder.prefill(free, [rows[r].prompt for r in taken])
        state.admit(free, [rows[r] for r in taken])
        for slot, row in zip(free, taken, strict=True):
            row_of[slot], admitted[slot] = row, clock

    admit()
    while True:
        live = [s for s in range(decoder.width) if row_of[s] is not None]
        # Checks are what frees slots; fewer than STOP_CHECK_STEPS only when every row ends.
        left = max(rows[row_of[s]].budget - (clock - admitted[s]) for s in live)
        for step in range(min(STOP_CHECK_STEPS, left)):
            if step:
                decoder.step(state.last[: decoder.width])
            state.draw(decoder.logits, params, stops)
            clock += 1
        finished = _harvest(state, live, decoder.width, row_of, results)
        if finished:
            decoder.free(finished)
        if continuous and not waiting:
            _narrow(decoder, state, row_of, admitted)
        if any(row is not None for row in row_of[: decoder.width]):
            decoder.step(state.last[: decoder.width])
        elif not waiting:
            return results
        if continuous or all(row is None for row in row_of):
            admit()


def _harvest(
    state: _Slots,
    live: list[int],
    width: int,
    row_of: list[int | None],
    results: list[Decoded | None],
) -> list[int]:
    """Collect the rows that are done (one device read for all); returns their slots."""
    done = state.done[:width].tolist()
    finished = [s for s in live if done[s]]
    if not finished:
        return []
    index = torch.tensor(finished, device=state.done.device)
    lengths = state.count[index].tolist()
    stopped = state.stopped[index].tolist()
    tokens, logprobs = state.tokens[index].tolist(), state.logprobs[index].tolist()
    for i, slot in enumerate(finished):
        n = lengths[i]
        results[row_of[slot]] = Decoded(tokens[i][:n], logprobs[i][:n], stopped[i])
        row_of[slot] = None
    return finished


def _narrow(
    decoder: SlotDecoder, state: _Slots, row_of: list[int | None], admitted: list[int]
) -> None:
    """Halve the width while the live rows fit (they move to the first slots)."""
    live = [s for s in range(decoder.width) if row_of[s] is not None]
    width = decoder.width
    while live and width > 1 and len(live) <= width // 2:
        width //= 2
    if width == decoder.width:
        return
    free = [s for s in range(decoder.width) if row_of[s] is None]
    order = live + free[: width - len(live)]
    decoder.compact(order)
    index = torch.tensor(order, device=state.key.device)
    for tensor in state.tensors():
        tensor[:width] = tensor[index]
    row_of[:width] = [row_of[s] for s in order]
    row_of[width:] = [None] * (len(row_of) - width)
    admitted[:width] = [admitted[s] for s in order]
