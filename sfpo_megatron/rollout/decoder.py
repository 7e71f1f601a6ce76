"""The embedded engine's model: the weights in fused buffers and a static-shape decoder.

Generation is launch-bound when each decode step runs a framework's generic forward (one
Python call per module, a growing cache, a new mask every step). Here one step is a fixed
sequence of kernels over preallocated buffers: a KV cache sized once per batch, the token,
position and slot of the step in small device tensors, and attention over a fixed span of
the cache (a multiple of :data:`SPAN`, masked). On CUDA each (batch, span) step is captured
once as a CUDA graph and replayed, so a step costs one launch plus the sampling kernels.

The arithmetic follows transformers' Qwen2/Qwen3/Llama modules (RMSNorm in fp32, RoPE tables
in fp32 cast to the model dtype, fp32 softmax), so log-probs agree with the actor's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sfpo_megatron.hf.mapping import hf_shapes, rules
from sfpo_megatron.models.arch import ModelArch, rope_inv_freq

SPAN = 128
"""Attention spans and cache lengths are multiples of this: few CUDA graphs per batch, and at
most SPAN - 1 masked positions read per step."""

PREFILL_TOKENS = 16384
"""Prompt tokens (padding included) per prefill chunk, which bounds its activations."""


class EngineWeights:
    """One buffer per row of the HF <-> Megatron table (:mod:`~sfpo_megatron.hf.mapping`):
    q/k/v and gate/up are each one buffer, so each is one GEMM. Every HF tensor
    is a view into its buffer (:attr:`views`), so the export stream copies straight into place
    and a captured CUDA graph stays valid across weight updates."""

    def __init__(self, arch: ModelArch, device: torch.device, dtype: torch.dtype) -> None:
        shapes = hf_shapes(arch)
        self.views: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        for rule in rules(arch):
            rows = [shapes[name][0] for name in rule.hf]
            trailing = shapes[rule.hf[0]][1:]
            buffer = torch.empty((sum(rows), *trailing), device=device, dtype=dtype)
            self._buffers[rule.hf[0]] = buffer
            self.views.update(zip(rule.hf, buffer.split(rows), strict=True))
        self._host: dict[str, torch.Tensor] = {}

    def fused(self, first_hf_name: str) -> torch.Tensor:
        """The buffer whose first part is ``first_hf_name`` (q_proj -> [q; k; v])."""
        return self._buffers[first_hf_name]

    @property
    def lm_head(self) -> torch.Tensor:
        """The output projection (the embedding itself when they are tied)."""
        return self._buffers.get("lm_head.weight", self._buffers["model.embed_tokens.weight"])

    def release(self) -> None:
        """Copy every buffer to the host and free its device storage (the views stay valid
        and see the storage again after :meth:`resume`)."""
        for name, buffer in self._buffers.items():
            self._host[name] = buffer.to("cpu", copy=True)
            buffer.untyped_storage().resize_(0)

    def resume(self, restore: bool = True) -> None:
        """Give the buffers their storage back, with the released contents when ``restore``
        (not when every weight is about to be overwritten)."""
        for name, buffer in self._buffers.items():
            host = self._host.pop(name)
            buffer.untyped_storage().resize_(host.numel() * host.element_size())
            if restore:
                buffer.copy_(host)

    @property
    def released(self) -> bool:
        return bool(self._host)


@dataclass
class _Cache:
    """Everything one batch's decode steps read and write, allocated once per batch shape
    (the static inputs and outputs of the captured graphs)."""

    keys: list[torch.Tensor]
    """Per layer [batch, kv heads, length, head dim]; values alike."""
    values: list[torch.Tensor]
    valid: torch.Tensor
    """[batch, length] bool: positions holding a real token."""
    token: torch.Tensor
    position: torch.Tensor
    slot: torch.Tensor
    logits: torch.Tensor
    cos: torch.Tensor
    """[length, head dim] RoPE tables in the model dtype; sin alike."""
    sin: torch.Tensor
    slot_host: int = 0
    """The slot of the next step, as the host knows it (no device read per step)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape


class StaticDecoder:
    """Prefill a left-padded batch, then decode one token per row per :meth:`step`."""

    def __init__(self, arch: ModelArch, weights: EngineWeights, cuda_graphs: bool) -> None:
        self.arch, self.w = arch, weights
        buffer = weights.fused("model.embed_tokens.weight")
        self.device, self.dtype = buffer.device, buffer.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._cache: _Cache | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def kv_bytes(self, rows: int, positions: int) -> int:
        """Bytes of the KV cache :meth:`prefill` allocates for ``rows`` x ``positions``."""
        a, length = self.arch, _spans(positions)
        per_position = 2 * a.num_layers * a.num_query_groups * a.head_dim * self.dtype.itemsize
        return rows * length * per_position

    def drop_cache(self) -> None:
        """Free the KV cache and the graphs captured over it."""
        self._cache = None

    def prefill(self, prompts: list[list[int]], steps: int) -> torch.Tensor:
        """Write the prompts' keys and values into a cache of ``max prompt + steps`` positions
        (rows with equal prompts are computed once) and return each row's next-token logits."""
        width = max(len(p) for p in prompts)
        cache = self._cache_for(len(prompts), width + steps)
        cache.valid.zero_()
        unique = list(dict.fromkeys(map(tuple, prompts)))
        unique_index = {prompt: i for i, prompt in enumerate(unique)}
        row_prompt = torch.tensor([unique_index[tuple(p)] for p in prompts], device=self.device)
        logits = torch.empty(len(prompts), self.arch.vocab_size, device=self.device)
        chunk = max(1, PREFILL_TOKENS // width)
        for begin in range(0, len(unique), chunk):
            part = unique[begin : begin + chunk]
            rows = ((row_prompt >= begin) & (row_prompt < begin + len(part))).nonzero()[:, 0]
            source = row_prompt[rows] - begin
            chunk_logits = self._prefill_chunk(cache, part, width, rows, source)
            logits[rows] = chunk_logits[source].float()
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        cache.valid[:, :width] = torch.arange(width, device=self.device) >= width - lengths[:, None]
        cache.position.copy_(lengths)
        cache.slot.fill_(width)
        cache.slot_host = width
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's last token (at the slot after the previous one) and return the
        next-token logits [batch, vocab] (a buffer overwritten by the next step)."""
        cache = self._cache
        slot = cache.slot_host
        cache.token.copy_(tokens)
        cache.valid[:, slot] = True
        span = min(cache.shape[1], _spans(slot + 1))
        if self.cuda_graphs:
            self._replay(cache, span)
        else:
            self._step(cache, span)
        cache.position.add_(1)
        cache.slot.add_(1)
        cache.slot_host = slot + 1
        return cache.logits

    def _cache_for(self, batch: int, length: int) -> _Cache:
        """Reuse the cache (and its graphs) when the batch matches and it is long enough."""
        old = self._cache
        if old is not None and old.shape[0] == batch and old.shape[1] >= length:
            return old
        self._cache = None
        length = _spans(length)
        a, dev = self.arch, self.device
        kv = (batch, a.num_query_groups, length, a.head_dim)
        positions = torch.arange(length, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(a)).repeat(1, 2)
        cache = _Cache(
            keys=[torch.zeros(kv, device=dev, dtype=self.dtype) for _ in range(a.num_layers)],
            values=[torch.zeros(kv, device=dev, dtype=self.dtype) for _ in range(a.num_layers)],
            valid=torch.zeros(batch, length, dtype=torch.bool, device=dev),
            token=torch.zeros(batch, dtype=torch.long, device=dev),
            position=torch.zeros(batch, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            logits=torch.zeros(batch, a.vocab_size, device=dev, dtype=self.dtype),
            cos=angles.cos().to(dev, self.dtype),
            sin=angles.sin().to(dev, self.dtype),
        )
        self._cache = cache
        return cache

    def _prefill_chunk(
        self,
        cache: _Cache,
        prompts: list[tuple[int, ...]],
        width: int,
        rows: torch.Tensor,
        source: torch.Tensor,
    ) -> torch.Tensor:
        """Full forward of left-padded ``prompts``; their keys/values go to cache ``rows``
        (``source`` = which prompt each row has). Returns the last position's logits."""
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
        lengths = torch.tensor([len(p) for p in prompts])[:, None]
        real = (torch.arange(width) >= width - lengths).to(self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        # A padding query sees itself, so no row of the mask is empty (its output is unused).
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
        groups = self.arch.num_attention_heads // self.arch.num_query_groups
        x = self.w.views["model.embed_tokens.weight"][ids.to(self.device)]
        for layer in range(self.arch.num_layers):
            q, k, v = self._qkv(layer, x, cache.cos[positions], cache.sin[positions])
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            cache.keys[layer][:, :, :width].index_copy_(0, rows, k[source])
            cache.values[layer][:, :, :width].index_copy_(0, rows, v[source])
            # Keys repeated per query head: every SDPA backend that takes a mask accepts it.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.repeat_interleave(groups, dim=1),
                v.repeat_interleave(groups, dim=1),
                attn_mask=mask[:, None],
            )
            x = self._finish_layer(layer, x, out.transpose(1, 2).flatten(2))
        return self._logits(x[:, -1])

    def _step(self, cache: _Cache, span: int) -> None:
        """One decode step for every row, reading only device buffers (graph-capturable)."""
        a = self.arch
        x = self.w.views["model.embed_tokens.weight"][cache.token]
        cos, sin = cache.cos[cache.position], cache.sin[cache.position]
        groups = a.num_attention_heads // a.num_query_groups
        for layer in range(a.num_layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            cache.keys[layer].index_copy_(2, cache.slot, k[:, :, None])
            cache.values[layer].index_copy_(2, cache.slot, v[:, :, None])
            # The query heads of a group act as that group's query positions: no GQA expansion.
            out = F.scaled_dot_product_attention(
                q.view(len(q), a.num_query_groups, groups, a.head_dim),
                cache.keys[layer][:, :, :span],
                cache.values[layer][:, :, :span],
                attn_mask=cache.valid[:, None, None, :span],
            )
            x = self._finish_layer(layer, x, out.flatten(1))
        cache.logits.copy_(self._logits(x))

    def _replay(self, cache: _Cache, span: int) -> None:
        graph = cache.graphs.get(span)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(cache, span)  # warm-up: same inputs, same writes as the replay
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(cache, span)
            cache.graphs[span] = graph
        graph.replay()

    def _qkv(
        self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input -> q [.., heads, dim], k and v [.., kv heads, dim], RoPE applied."""
        a, w, p = self.arch, self.w, f"model.layers.{layer}."
        h = _rms_norm(x, w.views[p + "input_layernorm.weight"], a.norm_eps)
        bias = w.fused(p + "self_attn.q_proj.bias") if a.qkv_bias else None
        qkv = F.linear(h, w.fused(p + "self_attn.q_proj.weight"), bias)
        kv = a.num_query_groups * a.head_dim
        q, k, v = qkv.split([a.num_attention_heads * a.head_dim, kv, kv], dim=-1)
        q = q.unflatten(-1, (a.num_attention_heads, a.head_dim))
        k = k.unflatten(-1, (a.num_query_groups, a.head_dim))
        v = v.unflatten(-1, (a.num_query_groups, a.head_dim))
        if a.qk_norm:
            q = _rms_norm(q, w.views[p + "self_attn.q_norm.weight"], a.norm_eps)
            k = _rms_norm(k, w.views[p + "self_attn.k_norm.weight"], a.norm_eps)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _finish_layer(self, layer: int, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, then the SwiGLU MLP + residual."""
        w, p = self.w, f"model.layers.{layer}."
        x = x + F.linear(attention, w.views[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, w.views[p + "post_attention_layernorm.weight"], self.arch.norm_eps)
        gate, up = F.linear(h, w.fused(p + "mlp.gate_proj.weight")).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.views[p + "mlp.down_proj.weight"])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(x, self.w.views["model.norm.weight"], self.arch.norm_eps)
        return F.linear(h, self.w.lm_head)


def _spans(positions: int) -> int:
    """``positions`` rounded up to whole attention spans."""
    return -(-positions // SPAN) * SPAN


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' order: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)
