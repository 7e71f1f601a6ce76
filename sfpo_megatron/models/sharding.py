"""Where each full Megatron tensor lives under TP/PP/VPP: the one mapping between a rank's
parameters and the unsharded model ("full state", Megatron names, layer indices global,
vocabulary unpadded). HF import/export build on it (and the tests' full-state helpers,
tests/full_state.py).
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


def is_glu_fc1(name: str, chunks: list) -> bool:
    """Whether ``name`` is a gated MLP's fc1 = [gate; up], split per half under TP."""
    return name.endswith("mlp.linear_fc1.weight") and unwrap(chunks[0]).config.gated_linear_unit


def sync_params(chunks: list) -> None:
    """Finish any overlapped parameter all-gather, so every rank's params are current."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def unshard(name: str, param: torch.nn.Parameter, chunks: list) -> torch.Tensor:
    """The full tensor of a parameter, gathered over the TP group (vocabulary still padded)."""
    local, glu = param.detach(), is_glu_fc1(name, chunks)
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
