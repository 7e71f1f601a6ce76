"""Training throughput of the Megatron actor (one process, one device) on a random Qwen2 model.

Times ``Actor.train_pass``: one optimizer step over micro-batch-size x micro-batches rows of
seq-length tokens (forward, backward, the GRPO loss and the distributed optimizer's step), after
one warm-up step. Model FLOPs per step (stated again in the output):

    6 * N_matmul * T  +  6 * L * S^2 * d_attn * R

T = tokens per step, R = rows per step, S = seq-length, L = layers, d_attn = heads x head_dim,
N_matmul = parameters excluding the input embedding table, plus the (padded) output layer
V x hidden even when it is tied. The second term is the causal half of the 12 * L * S^2 * d_attn
forward+backward FLOPs of the Q.K^T and P.V products (recompute, the loss and the optimizer are
not counted). The peak column is a large torch.matmul timed in the same run in the model's dtype
(8192^3 on CUDA, 1024^3 on CPU); % peak = model TFLOP/s / peak TFLOP/s. Peak memory is
torch.cuda.max_memory_allocated over the timed steps; plan GiB is ``sfpo-megatron plan``'s total
for the same config (GRPO: no SFPO snapshot), plan error = (plan - measured) / measured.

    python benchmarks/bench_actor.py --preset 0.5b --seq-length 1024 4096 --micro-batch-size 2
    python benchmarks/bench_actor.py --preset tiny --seq-length 64 --steps 2       # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sfpo_megatron.policy.batch import PolicyBatch

GEMM_REPEATS = 5
SHAPE_FLAGS = ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab")


@dataclass(frozen=True)
class Shape:
    """A Qwen2 model's shape; the presets match the published Qwen2.5 configs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tie: bool


PRESETS = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=300, tie=False),
    "small": Shape(hidden=128, layers=4, heads=4, kv_heads=2, ffn=352, vocab=2048, tie=False),
    "0.5b": Shape(hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936, tie=True),
    "1.5b": Shape(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936, tie=True),
}


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """Flags for the model shape: a preset (0.5b on CUDA, tiny on CPU) with per-field overrides."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for flag in SHAPE_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    parser.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")


def shape_from_args(args: argparse.Namespace) -> Shape:
    """The preset's shape with every flag given on the command line replacing its field."""
    preset = args.preset or ("0.5b" if torch.cuda.is_available() else "tiny")
    args.preset = preset
    given = {f: getattr(args, f) for f in (*SHAPE_FLAGS, "tie") if getattr(args, f) is not None}
    return replace(PRESETS[preset], **given)


def resolve_dtype(name: str) -> str:
    """``auto`` = bf16 on CUDA, fp32 on the CPU."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() else "fp32"


def write_hf_config(shape: Shape, directory: Path, max_positions: int) -> Path:
    """A Qwen2 config.json (no weights) for ``shape``; both model builders read only this."""
    from transformers import Qwen2Config

    Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(max_positions, 32768),
        rope_theta=1_000_000.0,
        tie_word_embeddings=shape.tie,
    ).save_pretrained(directory)
    return directory


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 0) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones, the
    device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        begin = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def gemm_peak_tflops(size: int, dtype: torch.dtype) -> float:
    """Best TFLOP/s of a size^3 torch.matmul: what one dense GEMM reaches on this device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(GEMM_REPEATS):
        synchronize()
        begin = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        best = min(best, time.perf_counter() - begin)
    return 2 * size**3 / best / 1e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--seq-length", type=int, nargs="+", default=[1024])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4, help="per optimizer step")
    parser.add_argument("--attention", choices=["auto", "sdpa", "local"], default="auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up)")
    parser.add_argument("--gemm-size", type=int, default=None, help="8192 on CUDA, 1024 on CPU")
    args = parser.parse_args(argv)
    if args.gemm_size is None:
        args.gemm_size = 8192 if torch.cuda.is_available() else 1024
    return args


def random_batch(rows: int, seq_length: int, vocab: int) -> PolicyBatch:
    """Random tokens; the first eighth of each row (at least one token) is prompt, the rest
    response; one random advantage per row."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(rows, seq_length, dtype=torch.bool)
    mask[:, : max(1, seq_length // 8)] = False
    return PolicyBatch(
        tokens=torch.randint(0, vocab, (rows, seq_length), generator=g),
        response_mask=mask,
        advantages=torch.randn(rows, generator=g),
    )


def matmul_params(actor, shape: Shape) -> int:
    """Parameters that take part in a GEMM per token: all but the input embedding table, plus
    the output layer (counted once more when it shares the embedding's storage)."""
    from sfpo_megatron.models.gpt import unwrap

    embedding = unwrap(actor.chunks[0]).embedding.word_embeddings.weight.numel()
    total = sum(p.numel() for chunk in actor.chunks for p in chunk.parameters())
    return total - embedding + (embedding if shape.tie else 0)


def main(argv: list[str] | None = None) -> None:
    """Build the actor once, then time ``--steps`` train passes at each sequence length."""
    from sfpo_megatron.config import load_config
    from sfpo_megatron.launch.parallel import shutdown
    from sfpo_megatron.models.spec import have_transformer_engine
    from sfpo_megatron.policy.actor import Actor
    from sfpo_megatron.tools.plan import plan_memory
    from sfpo_megatron.training.preflight import launch_checked

    args = parse_args(argv)
    shape = shape_from_args(args)
    dtype = resolve_dtype(args.dtype)
    rows = args.micro_batch_size * args.micro_batches
    directory = write_hf_config(shape, Path(tempfile.mkdtemp()), max(args.seq_length))
    cfg = load_config(
        None,
        [
            f"model.hf_config={directory}",
            "model.load_weights=false",
            f"model.dtype={dtype}",
            f"model.attention={args.attention}",
            "algorithm.name=grpo",
            "train.prompts_per_step=1",
            "train.mini_batch_prompts=1",
            f"train.samples_per_prompt={rows}",
            f"train.micro_batch_size={args.micro_batch_size}",
            "train.packing=false",  # equal full rows: nothing to pack (bench_packing.py)
        ],
    )
    arch, _ = launch_checked(cfg)
    actor = Actor.build(cfg, arch)
    n_matmul = matmul_params(actor, shape)
    params = sum(p.numel() for chunk in actor.chunks for p in chunk.parameters())
    cuda = torch.cuda.is_available()
    peak = gemm_peak_tflops(args.gemm_size, torch.bfloat16 if dtype == "bf16" else torch.float32)
    te = cuda and have_transformer_engine()
    spec = "transformer_engine" if args.attention == "auto" and te else args.attention
    spec = "sdpa" if spec == "auto" else spec

    print(f"device: {device_name()}, torch {torch.__version__}")
    print(
        f"model: preset {args.preset} {shape}, {params / 1e6:.1f} M params "
        f"({n_matmul / 1e6:.1f} M in GEMMs), dtype {dtype}, attention {args.attention} -> {spec}"
    )
    print(
        f"step: {args.micro_batches} micro-batches x {args.micro_batch_size} rows, "
        f"{args.steps} timed steps after 1 warm-up; s/step = mean"
    )
    print(
        "FLOPs/step = 6 * N_matmul * T + 6 * L * S^2 * d_attn * R "
        f"(N_matmul={n_matmul}, L={arch.num_layers}, "
        f"d_attn={arch.num_attention_heads * arch.head_dim}, R={rows})"
    )
    gemm = f"{dtype} torch.matmul {args.gemm_size}^3, best of {GEMM_REPEATS}"
    print(f"peak: {gemm}: {peak:.4g} TFLOP/s")
    print()
    print(
        "| seq | tokens/step | s/step | tokens/s | model TFLOP/s | peak TFLOP/s | % peak "
        "| peak mem GiB | plan GiB | plan error |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq in args.seq_length:
        batch = random_batch(rows, seq, shape.vocab)
        batch = replace(batch, old_logprobs=actor.forward_logprobs(batch)[0])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        actor.train_pass(batch)
        synchronize()
        begin = time.perf_counter()
        for _ in range(args.steps):
            actor.train_pass(batch)
        synchronize()
        seconds = (time.perf_counter() - begin) / args.steps
        tokens = rows * seq
        flops = (
            6 * n_matmul * tokens
            + 6 * arch.num_layers * seq**2 * (arch.num_attention_heads * arch.head_dim) * rows
        )
        tflops = flops / seconds / 1e12
        planned = plan_memory(cfg, arch, 1, seq_length=seq, flash_attention=spec != "local")
        planned_gib = planned.worst_rank.total / 2**30
        memory, error = "-", "-"
        if cuda:
            measured_gib = torch.cuda.max_memory_allocated() / 2**30
            memory = f"{measured_gib:.2f}"
            error = f"{100 * (planned_gib - measured_gib) / measured_gib:+.1f}%"
        print(
            f"| {seq} | {tokens} | {seconds:.4g} | {tokens / seconds:.1f} | {tflops:.4g} "
            f"| {peak:.4g} | {100 * tflops / peak:.1f} | {memory} | {planned_gib:.2f} | {error} |"
        )
    shutdown()


if __name__ == "__main__":
    main()
