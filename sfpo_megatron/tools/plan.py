"""Per-GPU memory plan of a model under a parallel layout (``sfpo-megatron plan``).

Exact components: the bytes of the tensors a rank holds once a training step has run, as
our build (models/gpt.py, optim.py, sfpo.py) allocates them; tests/test_plan.py counts the
tensors of CPU runs and requires equality.

- weights: this rank's params in the param dtype. TP splits the vocabulary (padded by
  ``padded_vocab_size``), QKV/FC1 rows and proj/FC2 columns; norms and QKV biases' replicas
  are whole. The embedding sits on the first stage, the output layer on the last (none
  when tied and PP = 1; its own copy on the last stage when tied and PP > 1). With the
  distributed optimizer the params live in DDP's padded param buffer.
- gradients: DDP's grad buffer in fp32 (``grad_reduce_in_fp32``), one per model chunk.
  With the distributed optimizer every param starts at a multiple of 64 elements and every
  bucket (one per chunk, the tied embedding in its own, ~40M-element buckets on the first
  chunk of stage 0 with overlapped grad reduce) ends at a multiple of lcm(DP, 128).
- master weights + Adam: 4 B (fp32 copy, bf16/fp16 only: fp32 params are their own
  masters) + 8 B (exp_avg, exp_avg_sq) per element this rank steps: all its params, or with
  the distributed optimizer its 1/DP slice of every bucket (DP ranks differ slightly).
- SFPO snapshot: 4 B per stepped element (``algorithm.name=sfpo``); 0 device B on host.

Estimates (training step peak of one rank; d = bytes of the param dtype, s x b tokens of
a micro-batch: ``train.max_tokens_per_micro_batch`` with packing, else micro-batch size x
sequence length, h hidden, q = heads x head_dim / TP, k = KV groups x head_dim / TP,
f = FFN / TP, h' = h / TP with sequence parallelism else h). Per layer and token, after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
adapted to GQA + SwiGLU + RMSNorm without dropout:
  d (4 h' + (q + 2k) + q + 3 f [+ q + k with QK-norm])   norm/linear inputs, Q K V, the
  attention output, SwiGLU input and output;
  + 4 B x heads/TP                       flash/fused attention (log-sum-exp), or
  + (4 + d) B x heads/TP x s             local attention: Megatron's local spec (no
                                         Transformer Engine) materialises the fp32 softmax
                                         of the S x S scores and its cast (4 B in fp32).
Full recompute keeps only each layer's input, d h' per token, plus one layer's full set.
Pipeline stage r holds min(P - r, M) micro-batches of its L / P layers (1F1B), or
min(2 (P - r - 1) + (V - 1) P + 1, M V) chunk passes of L / (P V) layers (interleaved), M
the micro-batches per mini-batch per DP rank (packed: as if every sequence were as long as
the plan's, so each micro-batch holds budget // sequence of them); the last stage adds the
final norm and output layer inputs (2 d h' per token). Logits (last stage, one micro-batch
in flight): the output layer's [b, S, V/TP] in dtype plus four fp32 tensors of that shape
live at once in the
vocab-parallel log-prob/entropy (scaled, masked, shifted logits, exp/probs): (d + 16) B.
Rollout engine (colocated): the configured fraction of GPU memory, which must hold its
bf16 weights (sharded like the trainer's TP) with the KV cache in the rest.
Not modelled: CUDA context, NCCL buffers, allocator fragmentation (``--reserve-gb``).
With Transformer Engine the layer params come in another order, which can shift the
distributed optimizer's 64-element padding when sizes are not multiples of 64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import Config, validate_layout
from sfpo_megatron.models.arch import (
    ModelArch,
    padded_vocab_size,
)

GIB = 2**30
COMPONENTS = (
    "weights",
    "gradients",
    "master weights",
    "adam states",
    "sfpo snapshot",
    "activations",
    "logits",
    "rollout engine",
)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class RankMemory:
    """Device bytes of one rank (TP ranks are alike) per component."""

    stage: int
    data_rank: int
    bytes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class MemoryPlan:
    """One layout's device bytes for every (pipeline stage, DP rank)."""

    cfg: Config
    data: int
    seq_length: int
    ranks: list[RankMemory]
    problems: list[str]
    """Reasons the layout cannot run however much memory there is (empty when it can)."""

    def worst(self, component: str) -> int:
        return max(r.bytes[component] for r in self.ranks)

    @property
    def worst_rank(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    def stage(self, stage: int) -> RankMemory:
        """The stage's largest-total DP rank."""
        return max((r for r in self.ranks if r.stage == stage), key=lambda r: r.total)

    def describe(self) -> str:
        p, m = self.cfg.parallel, self.cfg.model
        parts = [f"TP{p.tensor} PP{p.pipeline}"]
        if p.interleaved:
            parts.append(f"VPP{p.model_chunks}")
        parts.append(f"DP{self.data}")
        parts += ["SP"] * p.sequence_parallel + ["dist-opt"] * p.distributed_optimizer
        parts += [m.dtype] + ["recompute"] * m.recompute_activations
        if self.cfg.train.packing:
            parts.append(f"packed {self.cfg.token_budget} tokens, seq {self.seq_length}")
        else:
            parts.append(f"mbs {self.cfg.train.micro_batch_size} x seq {self.seq_length}")
        return " ".join(parts)


def _layer_numels(arch: ModelArch, tp: int) -> list[int]:
    """One transformer layer's params on a TP rank, in the local spec's registration order."""
    h, d = arch.hidden_size, arch.head_dim
    q = arch.num_attention_heads * d // tp
    qkv = q + 2 * arch.num_query_groups * d // tp
    f = arch.ffn_hidden_size // tp  # validate_layout checked that TP divides it
    numels = [h, h * q, qkv * h] + [qkv] * arch.qkv_bias + [d, d] * arch.qk_norm
    return numels + [h, 2 * f * h, h * f]


def _chunk_params(cfg: Config, arch: ModelArch, stage: int, chunk: int) -> list[tuple[int, bool]]:
    """(numel, own bucket under the distributed optimizer) of one model chunk's params."""
    p = cfg.parallel
    first = stage == chunk == 0
    last = stage == p.pipeline - 1 and chunk == p.model_chunks - 1
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.vocab_pad_multiple, p.tensor)
    embedding = vocab // p.tensor * arch.hidden_size
    shared = arch.tie_word_embeddings and p.pipeline > 1
    layers = arch.num_layers // p.pipeline_stages
    params = [(embedding, shared)] if first else []
    params += [(n, False) for _ in range(layers) for n in _layer_numels(arch, p.tensor)]
    if last:
        params.append((arch.hidden_size, False))
        if not (arch.tie_word_embeddings and first):
            params.append((embedding, shared))
    return params


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


Bucket = tuple[int, int, list[tuple[int, int]]]
"""A DDP bucket's (start, end) element offsets in its buffer and its params' (start, end)."""


def _buffer_layout(
    params: list[tuple[int, bool]], dp: int, dist_opt: bool, bucket_size: int | None
) -> list[Bucket]:
    """The buckets of one model chunk's DDP buffer, filled in reverse param order as
    Megatron's ``_ParamAndGradBuffer`` does."""
    param_pad, bucket_pad = (64, math.lcm(dp, 128)) if dist_opt else (1, 1)
    buckets: list[Bucket] = []
    ranges: list[tuple[int, int]] = []
    start = bucket_start = 0

    def close(end: int) -> int:
        nonlocal ranges, bucket_start
        buckets.append((bucket_start, _pad(end, bucket_pad), ranges))
        ranges, bucket_start = [], _pad(end, bucket_pad)
        return bucket_start

    for numel, own_bucket in reversed(params):
        own_bucket = own_bucket and dist_opt
        start = _pad(start, param_pad)
        if own_bucket and ranges:  # the tied embedding leaves the bucket of earlier params
            start = close(start)
        ranges.append((start, start + numel))
        full = bucket_size is not None and start + numel - bucket_start >= bucket_size
        start = close(start + numel) if own_bucket or full else start + numel
    if ranges:
        close(start)
    return buckets


def _stepped_elements(buckets: list[Bucket], dp: int, rank: int) -> int:
    """Elements the distributed optimizer of DP rank ``rank`` steps: the params' overlap
    with its 1/DP slice of every bucket (padding is stepped by nobody)."""
    total = 0
    for bucket_start, bucket_end, ranges in buckets:
        size = (bucket_end - bucket_start) // dp
        lo, hi = bucket_start + rank * size, bucket_start + (rank + 1) * size
        total += sum(max(0, min(hi, end) - max(lo, start)) for start, end in ranges)
    return total


def model_parameters(arch: ModelArch) -> int:
    """Parameters of the whole model (unpadded vocabulary, no TP)."""
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * sum(_layer_numels(arch, 1)) + arch.hidden_size + embeddings


def micro_batch_tokens(cfg: Config, seq_length: int) -> int:
    """Tokens of one micro-batch: the packing budget, or micro-batch size x sequence."""
    return cfg.token_budget if cfg.train.packing else seq_length * cfg.train.micro_batch_size


def micro_batches_per_rank(cfg: Config, dp: int, seq_length: int) -> int:
    """Micro-batches of one mini-batch on one DP rank (packed: with every sequence
    ``seq_length`` long, the most there can be)."""
    per_rank = math.ceil(cfg.sequences_per_mini_batch / dp)
    if not cfg.train.packing:
        return per_rank // cfg.train.micro_batch_size
    return math.ceil(per_rank / max(cfg.token_budget // seq_length, 1))


def _activations(
    cfg: Config, arch: ModelArch, stage: int, seq: int, micro_batches: int, flash: bool
) -> int:
    """The stage's stored activations at the training peak (module docstring formula)."""
    p, d = cfg.parallel, DTYPE_BYTES[cfg.model.dtype]
    tp, chunks = p.tensor, p.model_chunks
    hidden = arch.hidden_size / tp if p.sequence_parallel else arch.hidden_size
    q = arch.num_attention_heads * arch.head_dim / tp
    kv = arch.num_query_groups * arch.head_dim / tp
    heads = arch.num_attention_heads / tp
    elements = 4 * hidden + (q + 2 * kv) + q + 3 * arch.ffn_hidden_size / tp
    elements += (q + kv) * arch.qk_norm
    attention = 4 * heads if flash else (4 + d * (d < 4)) * heads * seq
    tokens = micro_batch_tokens(cfg, seq)
    layer, layer_input = tokens * (d * elements + attention), tokens * d * hidden
    if p.pipeline == 1:
        passes, layers = 1, arch.num_layers
    elif not p.interleaved:
        passes, layers = min(p.pipeline - stage, micro_batches), arch.num_layers // p.pipeline
    else:
        warmup = 2 * (p.pipeline - stage - 1) + (chunks - 1) * p.pipeline
        passes = min(warmup + 1, micro_batches * chunks)
        layers = arch.num_layers // p.pipeline_stages
    stored = passes * layers * (layer_input if cfg.model.recompute_activations else layer)
    stored += layer if cfg.model.recompute_activations else 0
    stored += 2 * layer_input if stage == p.pipeline - 1 else 0
    return math.ceil(stored)


def plan_memory(
    cfg: Config,
    arch: ModelArch,
    world_size: int,
    *,
    seq_length: int,
    flash_attention: bool = True,
    rollout_fraction: float = 0.0,
    gpu_bytes: int = 80 * GIB,
) -> MemoryPlan:
    """Device bytes of every (pipeline stage, DP rank) of ``cfg``'s layout on ``world_size``
    GPUs; raises :class:`ConfigError` for a layout ``validate_layout`` refuses."""
    dp = validate_layout(cfg, arch, world_size)
    p, d = cfg.parallel, DTYPE_BYTES[cfg.model.dtype]
    dist_opt, chunks = p.distributed_optimizer, p.model_chunks
    micro_batches = micro_batches_per_rank(cfg, dp, seq_length)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.vocab_pad_multiple, p.tensor)
    rollout = int(rollout_fraction * gpu_bytes)
    rollout_weights = 2 * model_parameters(arch) // p.tensor
    problems = []
    if rollout and rollout_weights > rollout:
        problems.append(
            f"the rollout engine's bf16 weights ({rollout_weights / GIB:.2f} GiB per GPU at "
            f"TP{p.tensor}) exceed its {rollout_fraction:g} of GPU memory"
        )
    sfpo_bytes = 4 * (cfg.algorithm.name == "sfpo" and cfg.algorithm.sfpo.snapshot == "gpu")
    master_bytes = 4 * (d < 4)
    ranks = []
    for stage in range(p.pipeline):
        buckets, unpadded = [], 0
        for chunk in range(chunks):
            params = _chunk_params(cfg, arch, stage, chunk)
            first_bucketed = p.overlap_grad_reduce and stage == chunk == 0
            bucket_size = max(40_000_000, 1_000_000 * dp) if first_bucketed else None
            buckets += _buffer_layout(params, dp, dist_opt, bucket_size)
            unpadded += sum(n for n, _ in params)
        buffer = sum(end - start for start, end, _ in buckets)
        activations = _activations(cfg, arch, stage, seq_length, micro_batches, flash_attention)
        last = stage == p.pipeline - 1
        tokens = micro_batch_tokens(cfg, seq_length)
        logits = tokens * vocab // p.tensor * (d + 16) if last else 0
        for rank in range(dp):
            stepped = _stepped_elements(buckets, dp, rank) if dist_opt else unpadded
            values = [
                (buffer if dist_opt else unpadded) * d,
                buffer * 4,
                stepped * master_bytes,
                stepped * 8,
                stepped * sfpo_bytes,
                activations,
                logits,
                rollout,
            ]
            ranks.append(RankMemory(stage, rank, dict(zip(COMPONENTS, values, strict=True))))
    return MemoryPlan(cfg, dp, seq_length, ranks, problems)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search_layouts(
    cfg: Config, arch: ModelArch, gpus: int, usable_bytes: int, **options
) -> list[MemoryPlan]:
    """Layouts of ``gpus`` GPUs whose worst rank fits in ``usable_bytes``, best first: least
    model parallelism (TP x PP; the rest is data parallel, the cheapest to scale), then
    without activation recompute (it costs a forward pass), then the most headroom.

    Tried: every TP x PP x DP = gpus that ``validate_layout`` accepts, with sequence
    parallelism whenever TP > 1, no virtual pipeline, recompute off and on; the rest of
    ``cfg`` (dtype, distributed optimizer, micro-batch size, snapshot) as given.
    """
    plans = []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for recompute in (False, True):
                variant = dataclasses.replace(
                    cfg,
                    parallel=dataclasses.replace(
                        cfg.parallel,
                        tensor=tp,
                        pipeline=pp,
                        virtual_pipeline=None,
                        data=None,
                        sequence_parallel=tp > 1,
                    ),
                    model=dataclasses.replace(cfg.model, recompute_activations=recompute),
                )
                try:
                    variant.validate()
                    plan = plan_memory(variant, arch, gpus, **options)
                except ConfigError:
                    continue
                if not plan.problems and plan.worst_rank.total <= usable_bytes:
                    plans.append(plan)
    plans.sort(
        key=lambda plan: (
            plan.cfg.parallel.tensor * plan.cfg.parallel.pipeline,
            plan.cfg.model.recompute_activations,
            plan.worst_rank.total,
        )
    )
    return plans
