"""The one table between Hugging Face tensor names and the full Megatron state
(:mod:`sfpo_megatron.models.sharding`), and the fusions it needs.

Qwen2/2.5, Qwen3 and Llama 3 share their names; which rows of the table a model uses
follows from its :class:`~sfpo_megatron.models.arch.ModelArch` (q/k/v biases, q/k norms,
tied embeddings), which ``models.arch.FAMILIES`` sets per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sfpo_megatron.models.arch import ModelArch

Fusion = Literal["copy", "qkv", "glu"]


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Full-state name (global layer index, unpadded vocabulary)."""
    hf: tuple[str, ...]
    """HF tensors fused into it, in order."""
    fusion: Fusion
    vocab_rows: bool = False


_LAYER = [
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
]
_QKV_BIAS = [
    (
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
]
_QK_NORM = [
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
]


def rules(arch: ModelArch) -> list[Rule]:
    """Every full-state tensor of the model with the HF tensors it is made of."""
    layer = _LAYER + (_QKV_BIAS if arch.qkv_bias else []) + (_QK_NORM if arch.qk_norm else [])
    table = [
        Rule(
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            "copy",
            vocab_rows=True,
        )
    ]
    for i in range(arch.num_layers):
        table += [
            Rule(f"decoder.layers.{i}.{m}", tuple(f"model.layers.{i}.{h}" for h in hf), f)
            for m, hf, f in layer
        ]
    table.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not arch.tie_word_embeddings:
        table.append(Rule("output_layer.weight", ("lm_head.weight",), "copy", vocab_rows=True))
    return table


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have for this config."""
    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (arch.vocab_size, h),
    }
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    wanted = {name for rule in rules(arch) for name in rule.hf}
    return {name: shape for name, shape in shapes.items() if name in wanted}


def fuse(
    rule: Rule, parts: list[torch.Tensor], head_dim: int, heads_per_group: int
) -> torch.Tensor:
    """HF tensors (or the same TP slice of each) -> the Megatron tensor (or its TP slice).

    QKV is interleaved by query group, [q heads of group g; k_g; v_g] for each g; fc1 is
    [gate; up]. A TP slice of each part fuses into the TP slice of the whole, because TP
    splits whole query groups and both GLU halves alike.
    """
    if rule.fusion == "copy":
        return parts[0]
    if rule.fusion == "glu":
        return torch.cat(parts, dim=0)
    q, k, v = parts
    groups = k.shape[0] // head_dim
    rest = q.shape[1:]
    stacked = [
        q.reshape(groups, heads_per_group * head_dim, *rest),
        k.reshape(groups, head_dim, *rest),
        v.reshape(groups, head_dim, *rest),
    ]
    return torch.cat(stacked, dim=1).reshape(-1, *rest)


def split(
    rule: Rule, full: torch.Tensor, head_dim: int, heads_per_group: int
) -> list[torch.Tensor]:
    """The Megatron tensor -> its HF tensors (the inverse of :func:`fuse`)."""
    if rule.fusion == "copy":
        return [full]
    if rule.fusion == "glu":
        return list(full.chunk(2, dim=0))
    rest = full.shape[1:]
    grouped = full.reshape(-1, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]
