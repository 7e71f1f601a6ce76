"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``: the layer
spec's attention when Transformer Engine is absent (see :mod:`sfpo_megatron.models.spec`)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise NotImplementedError(
            f"SDPAttention (model.attention=sdpa) does not support {what}; it computes causal "
            "self-attention of rows or of packed sequences (THD)"
        )


class SDPAttention(MegatronModule):
    """Megatron's ``DotProductAttention`` contract (query ``[s, b, heads, d]``, key and value
    ``[s, b, groups, d]`` of one TP rank -> context ``[s, b, heads * d]``) on a fused kernel.

    Megatron's local module materialises the ``[b, heads, s, s]`` scores and probabilities;
    SDPA runs a fused kernel (flash on CPU; cuDNN, flash or memory-efficient on CUDA) that
    keeps O(s) softmax statistics instead, and takes grouped KV heads as they are
    (``enable_gqa``) instead of repeating them. Rows are right-padded and masked causally
    only: padding sits after every real token, so causal attention is exact for them.

    Packed sequences (THD: ``[t, heads, d]`` with ``cu_seqlens``) attend causally within
    each sequence: on CUDA in half precision through torch's variable-length flash kernel,
    elsewhere (CPU, fp32, dropout) in a few fused calls over sequences of similar length.
    Anything beyond that (another mask type, an explicit mask, bias, sliding windows,
    context parallelism) is refused rather than silently ignored.
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
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        _require(attention_bias is None, "an attention bias")
        _require(attention_mask is None, "an explicit attention mask (the mask is causal)")
        _require(attn_mask_type in (None, AttnMaskType.causal), f"attn_mask_type={attn_mask_type}")
        _require(query.size(0) == key.size(0), "queries and keys of different lengths (KV cache)")
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            if packed_seq_params is not None:
                _require(packed_seq_params.qkv_format == "thd", "packed formats other than thd")
                return self._packed(query, key, value, packed_seq_params, dropout_p)
            seq, batch, heads, head_dim = query.shape
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            context = self._attend(q, k, v, dropout_p)
        return context.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Causal attention of ``[b, heads, s, d]`` rows."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout_p,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != q.size(1),
        )

    def _packed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        params: PackedSeqParams,
        dropout_p: float,
    ) -> torch.Tensor:
        """``[t, heads, d]`` packed sequences -> ``[t, heads * d]``."""
        tokens, heads, head_dim = query.shape
        bounds = params.cu_seqlens_q
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout_p:
            from torch.nn.attention.varlen import varlen_attn

            context = varlen_attn(
                query,
                key,
                value,
                bounds,
                bounds,
                params.max_seqlen_q,
                params.max_seqlen_kv,
                scale=self.softmax_scale,
                window_size=(-1, 0),
                enable_gqa=key.size(1) != heads,
            )
        else:
            context = self._packed_by_length(query, key, value, bounds.tolist(), dropout_p)
        return context.reshape(tokens, heads * head_dim)

    def _packed_by_length(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bounds: list[int],
        dropout_p: float,
    ) -> torch.Tensor:
        """Packed attention as a few padded calls: sequences of similar length gathered
        into ``[n, heads, longest, d]`` rows (padding after each, so causal attention is
        exact), their outputs scattered back; one call per sequence would cost a kernel
        launch and autograd node each, which dominates for many short sequences."""
        starts = bounds[:-1]
        lengths = [end - start for start, end in zip(starts, bounds[1:], strict=True)]
        sources, values = [], []
        for group in _length_groups(lengths):
            longest = lengths[group[0]]
            offsets = torch.arange(longest)
            index = torch.cat([starts[i] + offsets.clamp(max=lengths[i] - 1) for i in group])
            real = torch.cat([offsets[: lengths[i]] + n * longest for n, i in enumerate(group)])
            index, real = index.to(query.device), real.to(query.device)
            rows = [
                t.index_select(0, index).view(len(group), longest, *t.shape[1:]).transpose(1, 2)
                for t in (query, key, value)
            ]
            context = self._attend(*rows, dropout_p).transpose(1, 2).flatten(0, 1)
            sources.append(index.index_select(0, real))
            values.append(context.index_select(0, real))
        return query.new_zeros(query.shape).index_copy(0, torch.cat(sources), torch.cat(values))

    def _dropout_rng(self, dropout_p: float) -> contextlib.AbstractContextManager:
        """The RNG DotProductAttention drops probabilities with: the model-parallel tracker's
        (heads differ per TP rank) unless sequence parallelism is on."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Sequence indices in groups for one padded attention call each: longest first, a
    group grows while padding at most doubles its attention work (sum of squared lengths)."""
    groups: list[list[int]] = []
    work = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        square = lengths[i] ** 2
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] ** 2 <= 2 * (work + square):
            groups[-1].append(i)
            work += square
        else:
            groups.append([i])
            work = square
    return groups
