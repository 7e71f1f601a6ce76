"""The embedded engine's model: the weights in fused buffers and a slot-pool decoder.

Generation is launch-bound when each decode step runs a framework's generic forward (one
Python call per module, a growing cache, a new mask every step). Here one step is a fixed
sequence of kernels over preallocated buffers: a KV cache of ``slots`` rows allocated once,
each row (slot) holding one sequence from column 0, the token and position of each slot in
small device tensors, and attention over a fixed span of the cache (a multiple of
:data:`SPAN`, masked). A slot is refilled with a new prompt as soon as its row is done (see
:mod:`~sfpo_megatron.rollout.batching`); steps run over the first ``width`` slots. On CUDA
each (width, span) step is captured once as a CUDA graph and replayed, so a step costs one
launch; there are few such shapes (widths halve, spans are whole multiples of SPAN).

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
    """Everything the decode steps read and write, allocated once per pool shape (the static
    inputs and outputs of the captured graphs). Row ``s`` of every tensor is slot ``s``."""

    keys: list[torch.Tensor]
    """Per layer [slots, kv heads, length, head dim]; values alike."""
    values: list[torch.Tensor]
    valid: torch.Tensor
    """[slots, length] bool: positions holding a real token."""
    token: torch.Tensor
    position: torch.Tensor
    """[slots]: the column (= RoPE position) the slot's next token goes to."""
    logits: torch.Tensor
    cos: torch.Tensor
    """[length, head dim] RoPE tables in the model dtype; sin alike."""
    sin: torch.Tensor
    graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape

    def per_slot(self) -> list[torch.Tensor]:
        """The tensors whose rows move with their slot's sequence."""
        return [*self.keys, *self.values, self.valid, self.token, self.position, self.logits]


class SlotDecoder:
    """A pool of KV-cache slots: :meth:`prefill` puts prompts into chosen slots, :meth:`step`
    decodes one token in each of the first :attr:`width` slots, :meth:`free` and
    :meth:`compact` make room. The host mirrors each slot's column, so choosing a step's
    attention span reads nothing from the device."""

    def __init__(self, arch: ModelArch, weights: EngineWeights, cuda_graphs: bool) -> None:
        self.arch, self.w = arch, weights
        buffer = weights.fused("model.embed_tokens.weight")
        self.device, self.dtype = buffer.device, buffer.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._cache: _Cache | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.width = 0
        """Decode steps run over slots [0, width)."""
        self._steps = 0
        self._origin: dict[int, int] = {}
        """Each live slot's column minus the steps taken so far (no per-step host update)."""
        self._furthest = 0
        """The largest origin: the furthest column is ``_furthest + _steps``."""

    def kv_bytes(self, rows: int, positions: int) -> int:
        """Bytes of the KV cache :meth:`reserve` allocates for ``rows`` x ``positions``."""
        a, length = self.arch, _spans(positions)
        per_position = 2 * a.num_layers * a.num_query_groups * a.head_dim * self.dtype.itemsize
        return rows * length * per_position

    def drop_cache(self) -> None:
        """Free the KV cache and the graphs captured over it."""
        self._cache = None

    def reserve(self, slots: int, positions: int) -> None:
        """Make ``slots`` empty slots of at least ``positions`` positions each, reusing the
        cache (and its graphs) when it has exactly as many slots and is long enough."""
        old = self._cache
        if old is None or old.shape[0] != slots or old.shape[1] < positions:
            self._cache = None
            self._cache = self._allocate(slots, _spans(positions))
        self._cache.valid.zero_()
        self._cache.position.zero_()
        self.width = slots
        self._steps, self._origin, self._furthest = 0, {}, 0

    @property
    def logits(self) -> torch.Tensor:
        """[width, vocab]: each slot's next-token logits, from its prefill or the last step
        (a buffer overwritten by the next step)."""
        return self._cache.logits[: self.width]

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        """Write the prompts' keys and values into ``slots`` from column 0 (equal prompts are
        computed once) and their next-token logits into :attr:`logits`."""
        cache, dev = self._cache, self.device
        width = max(len(p) for p in prompts)
        unique = list(dict.fromkeys(map(tuple, prompts)))
        unique_index = {prompt: i for i, prompt in enumerate(unique)}
        row_prompt = torch.tensor([unique_index[tuple(p)] for p in prompts], device=dev)
        slot_index = torch.tensor(slots, device=dev)
        chunk = max(1, PREFILL_TOKENS // width)
        for begin in range(0, len(unique), chunk):
            part = unique[begin : begin + chunk]
            rows = ((row_prompt >= begin) & (row_prompt < begin + len(part))).nonzero()[:, 0]
            source = row_prompt[rows] - begin
            chunk_logits = self._prefill_chunk(cache, part, width, slot_index[rows], source)
            cache.logits.index_copy_(0, slot_index[rows], chunk_logits[source])
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        columns = torch.arange(cache.shape[1], device=dev)
        cache.valid.index_copy_(0, slot_index, columns < lengths[:, None])
        cache.position.index_copy_(0, slot_index, lengths)
        for slot, prompt in zip(slots, prompts, strict=True):
            self._origin[slot] = len(prompt) - self._steps
        self._furthest = max(self._origin.values())

    def free(self, slots: list[int]) -> None:
        """Done with these slots' sequences. A free slot inside the width still takes steps
        (on garbage) from column 0, so its column stays within the cache."""
        index = torch.tensor(slots, device=self.device)
        self._cache.valid.index_fill_(0, index, False)
        self._cache.position.index_fill_(0, index, 0)
        for slot in slots:
            self._origin.pop(slot, None)
        self._furthest = max(self._origin.values(), default=-self._steps)

    def compact(self, order: list[int]) -> None:
        """Move slot ``order[i]`` to slot ``i`` and decode only those: width = len(order)."""
        index = torch.tensor(order, device=self.device)
        for tensor in self._cache.per_slot():
            tensor[: len(order)] = tensor[index]
        self._origin = {i: self._origin[s] for i, s in enumerate(order) if s in self._origin}
        self.width = len(order)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each slot's last token [width] at its column and return the next-token logits
        [width, vocab] (a buffer overwritten by the next step)."""
        cache, width = self._cache, self.width
        span = min(cache.shape[1], _spans(self._furthest + self._steps + 1))
        cache.token[:width].copy_(tokens)
        if self.cuda_graphs:
            self._replay(cache, width, span)
        else:
            self._step(cache, width, span)
        cache.position[:width].add_(1)
        self._steps += 1
        return cache.logits[:width]

    def _allocate(self, slots: int, length: int) -> _Cache:
        a, dev = self.arch, self.device
        kv = (slots, a.num_query_groups, length, a.head_dim)
        positions = torch.arange(length, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(a)).repeat(1, 2)
        return _Cache(
            keys=[torch.zeros(kv, device=dev, dtype=self.dtype) for _ in range(a.num_layers)],
            values=[torch.zeros(kv, device=dev, dtype=self.dtype) for _ in range(a.num_layers)],
            valid=torch.zeros(slots, length, dtype=torch.bool, device=dev),
            token=torch.zeros(slots, dtype=torch.long, device=dev),
            position=torch.zeros(slots, dtype=torch.long, device=dev),
            logits=torch.zeros(slots, a.vocab_size, device=dev, dtype=self.dtype),
            cos=angles.cos().to(dev, self.dtype),
            sin=angles.sin().to(dev, self.dtype),
        )

    def _prefill_chunk(
        self,
        cache: _Cache,
        prompts: list[tuple[int, ...]],
        width: int,
        slots: torch.Tensor,
        source: torch.Tensor,
    ) -> torch.Tensor:
        """Full forward of right-padded ``prompts``; their keys/values go to cache ``slots``
        (``source`` = which prompt each slot has). Returns each prompt's last-token logits."""
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        positions = torch.arange(width, device=self.device)
        # Causal: a real query sees only real keys (the padding comes after every real token).
        mask = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        groups = self.arch.num_attention_heads // self.arch.num_query_groups
        x = self.w.views["model.embed_tokens.weight"][ids.to(self.device)]
        for layer in range(self.arch.num_layers):
            q, k, v = self._qkv(layer, x, cache.cos[positions], cache.sin[positions])
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            cache.keys[layer][:, :, :width].index_copy_(0, slots, k[source])
            cache.values[layer][:, :, :width].index_copy_(0, slots, v[source])
            # Keys repeated per query head: every SDPA backend that takes a mask accepts it.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.repeat_interleave(groups, dim=1),
                v.repeat_interleave(groups, dim=1),
                attn_mask=mask,
            )
            x = self._finish_layer(layer, x, out.transpose(1, 2).flatten(2))
        return self._logits(x[torch.arange(len(prompts), device=self.device), last])

    def _step(self, cache: _Cache, width: int, span: int) -> None:
        """One decode step for slots [0, width), reading only device buffers (graph-capturable):
        each slot's key and value go to its own column, which becomes valid."""
        a = self.arch
        position = cache.position[:width]
        x = self.w.views["model.embed_tokens.weight"][cache.token[:width]]
        cos, sin = cache.cos[position], cache.sin[position]
        groups = a.num_attention_heads // a.num_query_groups
        column = position.view(width, 1, 1, 1).expand(width, a.num_query_groups, 1, a.head_dim)
        valid = cache.valid[:width].scatter_(1, position[:, None], True)
        for layer in range(a.num_layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys, values = cache.keys[layer][:width], cache.values[layer][:width]
            keys.scatter_(2, column, k[:, :, None])
            values.scatter_(2, column, v[:, :, None])
            # The query heads of a group act as that group's query positions: no GQA expansion.
            out = F.scaled_dot_product_attention(
                q.view(width, a.num_query_groups, groups, a.head_dim),
                keys[:, :, :span],
                values[:, :, :span],
                attn_mask=valid[:, None, None, :span],
            )
            x = self._finish_layer(layer, x, out.flatten(1))
        cache.logits[:width].copy_(self._logits(x))

    def _replay(self, cache: _Cache, width: int, span: int) -> None:
        graph = cache.graphs.get((width, span))
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(cache, width, span)  # warm-up: same inputs, same writes as the replay
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(cache, width, span)
            cache.graphs[width, span] = graph
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
