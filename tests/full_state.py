"""Full-state helpers for tests: load a whole model's tensors (Megatron names, layer indices
global, vocabulary unpadded) into this rank's shards, and gather them back, on the mapping of
:mod:`sfpo_megatron.models.sharding`. Small models only: every rank holds the full state."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.models.sharding import (
    VOCAB_ROWS,
    is_glu_fc1,
    local_parameters,
    sync_params,
    unshard,
)


def shard_of(full: torch.Tensor, param: torch.nn.Parameter, glu: bool) -> torch.Tensor:
    """This TP rank's slice of a full tensor (vocabulary rows already padded)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if glu:  # fc1 = [gate; up]: each rank holds [gate_r; up_r]
        return torch.cat([half.chunk(tp, dim=dim)[rank] for half in full.chunk(2, dim=dim)], dim)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def load_full_state(chunks: list, state: dict[str, torch.Tensor]) -> None:
    """Copy each parameter's slice out of a full state; vocabulary rows are zero-padded.

    Call before the optimizer is built (it copies the params into its fp32 main params).
    Missing, unexpected or misshaped tensors raise with their names.
    """
    seen = set()
    for name, param in local_parameters(chunks):
        if name not in state:
            raise KeyError(f"full state has no tensor {name!r}")
        full = state[name]
        if name in VOCAB_ROWS:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rows = param.shape[0] * tp
            if full.shape[0] > rows:
                raise ValueError(f"{name}: {full.shape[0]} rows exceed the padded vocab {rows}")
            full = torch.nn.functional.pad(full, (0, 0, 0, rows - full.shape[0]))
        piece = shard_of(full, param, is_glu_fc1(name, chunks))
        if piece.shape != param.shape:
            raise ValueError(
                f"{name}: slice shape {tuple(piece.shape)} != parameter shape "
                f"{tuple(param.shape)} (full {tuple(full.shape)})"
            )
        param.copy_(piece)
        seen.add(name)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        unexpected = set(state) - seen
        if unexpected:
            raise KeyError(f"full state has tensors the model does not: {sorted(unexpected)}")


@torch.no_grad()
def gather_full_state(chunks: list, vocab_size: int) -> dict[str, torch.Tensor]:
    """The full state on every rank (small models). Waits for any overlapped
    parameter all-gather first, so the values are those after the last optimizer step."""
    sync_params(chunks)
    stage: dict[str, torch.Tensor] = {}
    for name, param in local_parameters(chunks):
        full = unshard(name, param, chunks)
        stage[name] = (full[:vocab_size] if name in VOCAB_ROWS else full).cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return stage
    group = parallel_state.get_pipeline_model_parallel_group()
    stages: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(stages, stage, group=group)
    merged: dict[str, torch.Tensor] = {}
    for part in stages:
        merged.update(part)
    return merged
