"""Packed vs padded micro-batches of the actor (``train.packing``) on a long-tail RL batch.

The batch (printed): prompts uniform in [64, 512] tokens; responses long-tailed, about 10%
of rows at ``--max-response`` and the rest exponential, for a mean of about 25% of the cap.
Padded: ``--micro-batch-size`` rows per micro-batch, each as long as the batch's longest.
Packed: whole sequences end to end under a budget of ``--micro-batch-size`` x the longest
possible sequence (prompt cap + response cap: the config default, the same peak shape).

Timed in one run, on one random Qwen2-shape model (one actor, its weights shared by both
cuts): one GRPO training pass over the whole batch (one optimizer step) and one log-prob
forward, each the median of ``--repeats`` after one warm-up. Processed tokens = what the
model runs (padding included), useful = prompt + response tokens. Peak memory: CUDA
``max_memory_allocated`` per phase; on the CPU the process's peak RSS, which only grows, so
the packed phases run first and the padded reading is the larger of the two.

    python benchmarks/bench_packing.py                                  # CPU, < 3 minutes
    python benchmarks/bench_packing.py --preset 1.5b --max-response 8192 --rows 64   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
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

from sfpo_megatron.policy.batch import PolicyBatch

PROMPT_RANGE = (64, 512)
CAPPED_FRACTION = 0.10
MEAN_FRACTION = 0.25


def long_tail_lengths(rows: int, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """(prompt, response) lengths: responses at ``cap`` for 10% of rows (rounded), exponential
    below it for the rest, with the mean over all rows ~25% of ``cap``."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, (rows,), generator=g)
    capped = torch.zeros(rows, dtype=torch.bool)
    capped[torch.randperm(rows, generator=g)[: round(CAPPED_FRACTION * rows)]] = True
    rest_mean = cap * (MEAN_FRACTION - CAPPED_FRACTION) / (1 - CAPPED_FRACTION)
    draws = torch.empty(rows).exponential_(1 / rest_mean, generator=g).ceil()
    responses = torch.where(capped, torch.full((rows,), cap), draws.clamp(1, cap - 1).long())
    return prompts.tolist(), responses.tolist()


def make_batch(prompts: list[int], responses: list[int], vocab: int, seed: int) -> PolicyBatch:
    """Right-padded random rows with these prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in zip(prompts, responses, strict=True))
    tokens = torch.randint(0, vocab, (len(prompts), width), generator=g)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        mask[i, p : p + r] = True
        tokens[i, p + r :] = 0
    return PolicyBatch(tokens, mask, advantages=torch.randn(len(prompts), generator=g))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--rows", type=int, default=64, help="sequences in the batch")
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after 1 warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.preset is None and not torch.cuda.is_available():
        args.preset = "small"
    return args


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def main(argv: list[str] | None = None) -> None:
    from sfpo_megatron.config import load_config
    from sfpo_megatron.launch.parallel import shutdown
    from sfpo_megatron.policy.actor import Actor
    from sfpo_megatron.policy.micro_batches import real_lengths
    from sfpo_megatron.training.preflight import launch_checked

    args = parse_args(argv)
    shape = shape_from_args(args)
    dtype = resolve_dtype(args.dtype)
    prompt_cap = PROMPT_RANGE[1]
    directory = write_hf_config(shape, Path(tempfile.mkdtemp()), prompt_cap + args.max_response)
    overrides = [
        f"model.hf_config={directory}",
        "model.load_weights=false",
        f"model.dtype={dtype}",
        "algorithm.name=grpo",
        "train.prompts_per_step=1",
        "train.mini_batch_prompts=1",
        f"train.samples_per_prompt={args.rows}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"data.max_prompt_length={prompt_cap}",
        f"rollout.max_response_length={args.max_response}",
    ]
    cfg = load_config(None, overrides)
    arch, _ = launch_checked(cfg)
    packed_actor = Actor.build(cfg, arch)
    padded_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=False))
    padded_actor = Actor(
        padded_cfg, arch, packed_actor.chunks, packed_actor.optimizer, packed_actor.scheduler
    )

    prompts, responses = long_tail_lengths(args.rows, args.max_response, args.seed)
    batch = make_batch(prompts, responses, shape.vocab, args.seed)
    useful = sum(real_lengths(batch))
    capped = sum(r == args.max_response for r in responses)
    print(f"device: {device_name()}, torch {torch.__version__}")
    print(f"model: preset {args.preset} {shape}, dtype {dtype}")
    print(
        f"batch: {args.rows} rows, prompts uniform in {list(PROMPT_RANGE)} (mean "
        f"{sum(prompts) / args.rows:.0f}), responses mean {sum(responses) / args.rows:.0f} = "
        f"{100 * sum(responses) / args.rows / args.max_response:.1f}% of the cap "
        f"{args.max_response}, {capped} rows ({100 * capped / args.rows:.0f}%) at the cap; "
        f"longest row {batch.seq_length} tokens, {useful} useful tokens"
    )
    print(
        f"padded: {args.micro_batch_size} rows per micro-batch; packed: budget "
        f"{cfg.token_budget} tokens per micro-batch; {args.repeats} timed call(s) after 1 "
        "warm-up, median"
    )
    results = {}
    for name, actor in (("packed", packed_actor), ("padded", padded_actor)):
        plan = actor.plan(batch)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        old, _ = actor.forward_logprobs(batch)
        trained = dataclasses.replace(batch, old_logprobs=old)
        forward = timed(lambda a=actor: a.forward_logprobs(batch), args.repeats, warmup=0)
        train = timed(lambda a=actor, b=trained: a.train_pass(b), args.repeats, warmup=1)
        results[name] = dict(
            micro_batches=len(plan.micro_batches),
            processed=plan.processed_tokens,
            forward=forward,
            train=train,
            memory=peak_memory_gib(),
        )
    print()
    print(
        "| cut | micro-batches | processed tokens | processed/useful | forward s | train pass s "
        "| peak memory GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['micro_batches']} | {r['processed']} | "
            f"{r['processed'] / useful:.2f} | {r['forward']:.3f} | {r['train']:.3f} | "
            f"{r['memory']:.2f} |"
        )
    packed, padded = results["packed"], results["padded"]
    print(
        f"packing speed-up: {padded['train'] / packed['train']:.2f}x (train pass), "
        f"{padded['forward'] / packed['forward']:.2f}x (forward); processed/useful tokens: "
        f"padded {padded['processed'] / useful:.2f}, packed {packed['processed'] / useful:.2f}"
    )
    shutdown()


if __name__ == "__main__":
    main()
