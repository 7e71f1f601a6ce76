"""Where each full Megatron tensor lives under TP/PP/VPP: the one mapping between a rank's
parameters and the unsharded model ("full state", Megatron names, layer indices global,
vocabulary unpadded). HF import/export and tests build on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.models.gpt import unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the next linear.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
VOCAB_ROWS = (EMBEDDING, OUTPUT)


def local_parameters(
    chunks: list, tied_copy: bool = True
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(full name, parameter) for every parameter of this rank's chunks.

    Layer indices are made global from each layer's ``layer_number``; a tied output layer
    on the last pipeline stage is reported under the embedding's name (or, with
    ``tied_copy=False``, left out: the first stage holds the same tensor).
    """
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            match = _LAYER.match(name)
            if match:
                layer = model.decoder.layers[int(match.group(1))]
                rest = name[match.end() :]
                name = f"decoder.layers.{layer.layer_number - 1}.{_TE_NAMES.get(rest, rest)}"
            elif name == OUTPUT and model.share_embeddings_and_output_weights:
                if not tied_copy:
                    continue
                name = EMBEDDING
            yield name, param


def _is_glu_fc1(name: str, chunks: list) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and unwrap(chunks[0]).config.gated_linear_unit


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


def sync_params(chunks: list) -> None:
    """Finish any overlapped parameter all-gather, so every rank's params are current."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def unshard(name: str, param: torch.nn.Parameter, chunks: list) -> torch.Tensor:
    """The full tensor of a parameter, gathered over the TP group (vocabulary still padded)."""
    local, glu = param.detach(), _is_glu_fc1(name, chunks)
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim = param.partition_dim
    if glu:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(parts, dim)


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
        piece = shard_of(full, param, _is_glu_fc1(name, chunks))
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
    """The full state on every rank (small models: tests, tools). Waits for any overlapped
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
