"""Generation speed of the embedded rollout engine (static KV cache; each decode step a CUDA
graph on GPU unless --no-cuda-graphs) on a random Qwen2 model of a preset shape (see
bench_actor.py for the shape flags).

Weights arrive through ``update_weights`` from random tensors of the engine's own parameter
shapes. Every row decodes exactly --new-tokens tokens (no stop tokens, temperature 1). After a
warm-up, a prefill-only call (max_new_tokens=1) and the full call are each timed --repeats
times; seconds are medians. tokens/s = batch x new tokens / seconds; ms/decode step =
(seconds - prefill seconds) / (new tokens - 1).

    python benchmarks/bench_generate.py --preset 0.5b --batch 64 --prompt-len 512 --new-tokens 512
    python benchmarks/bench_generate.py --preset tiny --batch 4 --prompt-len 16 --new-tokens 16
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_actor import (
    add_shape_args,
    device_name,
    resolve_dtype,
    shape_from_args,
    timed,
    write_hf_config,
)

from sfpo_megatron.common.samples import Bucket, SamplingParams
from sfpo_megatron.rollout.embedded import EmbeddedEngine

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--batch", type=int, default=64, help="rows decoded together")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (one prefill step and at least one decode step)")
    return args


def random_buckets(engine: EmbeddedEngine) -> Iterator[Bucket]:
    """One bucket per engine parameter: norms near 1, the rest N(0, 0.02), made one at a time
    so the stream never holds a second copy of the model."""
    for name, param in engine.weights.views.items():
        tensor = torch.randn(param.shape, device=param.device, dtype=param.dtype) * 0.02
        yield [(name, tensor + 1 if "norm" in name else tensor)]


def main(argv: list[str] | None = None) -> None:
    """Load random weights into the engine, then time prefill and full generation."""
    args = parse_args(argv)
    shape = shape_from_args(args)
    dtype = resolve_dtype(args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    positions = args.prompt_len + args.new_tokens
    directory = write_hf_config(shape, Path(tempfile.mkdtemp()), positions)
    engine = EmbeddedEngine(
        directory, device=device, dtype=DTYPES[dtype], cuda_graphs=args.cuda_graphs
    )
    engine.update_weights(random_buckets(engine), version=1)
    params = sum(p.numel() for p in engine.weights.views.values())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape.vocab, (args.batch, args.prompt_len), generator=g).tolist()

    def run(new_tokens: int) -> None:
        engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, seed=0))

    run(2)
    prefill = timed(lambda: run(1), args.repeats)
    seconds = timed(lambda: run(args.new_tokens), args.repeats)
    decode_ms = (seconds - prefill) / (args.new_tokens - 1) * 1e3

    print(f"device: {device_name()}, torch {torch.__version__}")
    print(f"model: preset {args.preset} {shape}, {params / 1e6:.1f} M params, dtype {dtype}")
    print(f"decode steps: {'CUDA graphs' if engine.decoder.cuda_graphs else 'eager'}")
    print(
        f"seconds: median of {args.repeats} after 1 warm-up; tokens/s = batch x new tokens / "
        "seconds; ms/decode step = (seconds - prefill s) / (new tokens - 1)"
    )
    print()
    print("| batch | prompt len | new tokens | seconds | tokens/s | prefill s | ms/decode step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.batch} | {args.prompt_len} | {args.new_tokens} | {seconds:.4g} "
        f"| {args.batch * args.new_tokens / seconds:.1f} | {prefill:.4g} | {decode_ms:.4g} |"
    )


if __name__ == "__main__":
    main()
