"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``: the layer
spec's attention when Transformer Engine is absent (see :mod:`sfpo_megatron.models.spec`)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise NotImplementedError(
            f"SDPAttention (model.attention=sdpa) does not support {what}; it computes causal "
            "self-attention of unpacked rows only"
        )


class SDPAttention(MegatronModule):
    """Megatron's ``DotProductAttention`` contract (query ``[s, b, heads, d]``, key and value
    ``[s, b, groups, d]`` of one TP rank -> context ``[s, b, heads * d]``) on a fused kernel.

    Megatron's local module materialises the ``[b, heads, s, s]`` scores and probabilities;
    SDPA runs a fused kernel (flash on CPU; cuDNN, flash or memory-efficient on CUDA) that
    keeps O(s) softmax statistics instead, and takes grouped KV heads as they are
    (``enable_gqa``) instead of repeating them. The actor's rows are right-padded and masked
    causally only: padding sits after every real token, so causal attention is exact for
    them. Anything beyond that (another mask type, an explicit mask, bias, packed sequences,
    sliding windows, context parallelism) is refused rather than silently ignored.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        _require(attn_mask_type == AttnMaskType.causal, f"attn_mask_type={attn_mask_type.name}")
        _require(attention_type == "self", f"attention_type={attention_type!r}")
        _require(config.context_parallel_size == 1, "context parallelism")
        _require(config.window_size is None, "sliding-window attention")
        _require(config.softmax_type == "vanilla", f"softmax_type={config.softmax_type!r}")
        # apply_query_key_layer_scaling divides the scores by the layer number and the softmax
        # multiplies it back: a guard for fp16 scores that SDPA never materialises.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        _require(packed_seq_params is None, "packed sequences")
        _require(attention_bias is None, "an attention bias")
        _require(attention_mask is None, "an explicit attention mask (the mask is causal)")
        _require(attn_mask_type in (None, AttnMaskType.causal), f"attn_mask_type={attn_mask_type}")
        _require(query.size(0) == key.size(0), "queries and keys of different lengths (KV cache)")
        seq, batch, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout_p,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=k.size(1) != heads,
            )
        return context.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)

    def _dropout_rng(self, dropout_p: float) -> contextlib.AbstractContextManager:
        """The RNG DotProductAttention drops probabilities with: the model-parallel tracker's
        (heads differ per TP rank) unless sequence parallelism is on."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()
