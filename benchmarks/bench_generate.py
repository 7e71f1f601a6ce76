"""Generation speed of the embedded rollout engine (a pool of KV-cache slots; each decode step
a CUDA graph on GPU unless --no-cuda-graphs) on a random Qwen2 model of a preset shape (see
bench_actor.py for the shape flags).

Weights arrive through ``update_weights`` from random tensors of the engine's own parameter
shapes. Every row decodes exactly --new-tokens tokens (no stop tokens, temperature 1). After a
warm-up, a prefill-only call (max_new_tokens=1) and the full call are each timed --repeats
times; seconds are medians. tokens/s = batch x new tokens / seconds; ms/decode step =
(seconds - prefill seconds) / (new tokens - 1).

    python benchmarks/bench_generate.py --preset 0.5b --batch 64 --prompt-len 512 --new-tokens 512
    python benchmarks/bench_generate.py --preset tiny --batch 4 --prompt-len 16 --new-tokens 16

--long-tail: --batch rows whose prompts are uniform in [--prompt-len / 8, --prompt-len] tokens
and whose responses have the long-tail lengths of the packing benchmark (about 10% at the cap
--new-tokens, the rest exponential with mean cap / 6: mean about 25% of the cap; the realised
numbers are printed), decoded in --slots KV-cache slots. Each row runs exactly its length (no
stop tokens). On the same rows and seeds, static batching (each group of --slots rows runs as
long as its longest) against continuous batching (a done row's slot takes the next prompt),
which must give the same tokens; then, with --engines 2 (the default on the CPU, CPU only),
continuous batching by 1 engine process at 1 thread against 2 engine processes at 1 thread
each, splitting the rows as data-parallel rollout does (the time of 2 is that of the slower;
both start together; the engine processes live through the whole run). On the CPU every
engine runs at 1 thread. Each comparison runs --repeats rounds (default 2), its runs in turn
within a round, and keeps each run's best time (load on a shared machine only slows a run).

    python benchmarks/bench_generate.py --long-tail
    python benchmarks/bench_generate.py --long-tail --preset 0.5b --batch 512 --slots 128 \
        --prompt-len 512 --new-tokens 1024 --engines 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench_actor import (
    add_shape_args,
    device_name,
    resolve_dtype,
    shape_from_args,
    synchronize,
    timed,
    write_hf_config,
)

from sfpo_megatron.common.samples import Bucket, SamplingParams
from sfpo_megatron.rollout.batching import Row
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.sampler import row_key

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FIXED = {"batch": 64, "prompt_len": 512, "new_tokens": 512, "repeats": 3}
LONG_TAIL = {"batch": 1536, "prompt_len": 64, "new_tokens": 128, "repeats": 2}
"""Defaults per mode: the long-tail default runs in under 3 minutes on 2 CPU cores."""
AT_CAP = 0.1
"""Share of long-tail rows whose response reaches the cap."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--batch", type=int, help="rows (fixed: 64, all decoded together)")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (long tail: the cap)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--long-tail", action="store_true", help="static vs continuous batching")
    parser.add_argument("--slots", type=int, default=32, help="long tail: KV-cache slots")
    parser.add_argument(
        "--engines", type=int, choices=[1, 2], help="long tail: 2 = also 1 vs 2 CPU processes"
    )
    args = parser.parse_args(argv)
    for key, value in (LONG_TAIL if args.long_tail else FIXED).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = torch.cuda.is_available()
    args.engines = args.engines or (1 if cuda else 2)
    if args.engines == 2 and cuda:
        parser.error("--engines 2 compares CPU processes at one thread each: CPU only")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (one prefill step and at least one decode step)")
    return args


def random_buckets(engine: EmbeddedEngine) -> Iterator[Bucket]:
    """One bucket per engine parameter: norms near 1, the rest N(0, 0.02), made one at a time
    so the stream never holds a second copy of the model (the same weights in every process:
    the generator is seeded)."""
    generator = torch.Generator(device=engine.device).manual_seed(0)
    for name, param in engine.weights.views.items():
        tensor = torch.randn(
            param.shape, device=param.device, dtype=param.dtype, generator=generator
        )
        yield [(name, tensor * 0.02 + 1 if "norm" in name else tensor * 0.02)]


def build_engine(args: argparse.Namespace, kv_cache_gb: float | None = None) -> EmbeddedEngine:
    """The engine for the shape flags, with its random weights loaded."""
    shape = shape_from_args(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    positions = args.prompt_len + args.new_tokens
    directory = write_hf_config(shape, Path(tempfile.mkdtemp()), positions)
    extra = {} if kv_cache_gb is None else {"kv_cache_gb": kv_cache_gb}
    engine = EmbeddedEngine(
        directory,
        device=device,
        dtype=DTYPES[resolve_dtype(args.dtype)],
        cuda_graphs=args.cuda_graphs,
        **extra,
    )
    engine.update_weights(random_buckets(engine), version=1)
    return engine


def describe(args: argparse.Namespace, engine: EmbeddedEngine) -> None:
    params = sum(p.numel() for p in engine.weights.views.values())
    dtype = resolve_dtype(args.dtype)
    print(f"device: {device_name()}, torch {torch.__version__}")
    print(
        f"model: preset {args.preset} {shape_from_args(args)}, {params / 1e6:.1f} M params, {dtype}"
    )
    print(f"decode steps: {'CUDA graphs' if engine.decoder.cuda_graphs else 'eager'}")


def fixed_batch(args: argparse.Namespace) -> None:
    """Load random weights into the engine, then time prefill and full generation."""
    engine = build_engine(args)
    vocab = engine.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()

    def run(new_tokens: int) -> None:
        engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, seed=0))

    run(2)
    prefill = timed(lambda: run(1), args.repeats)
    seconds = timed(lambda: run(args.new_tokens), args.repeats)
    decode_ms = (seconds - prefill) / (args.new_tokens - 1) * 1e3

    describe(args, engine)
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


def long_tail_rows(args: argparse.Namespace, vocab: int) -> list[Row]:
    """The long-tail batch: prompt lengths uniform in [prompt_len / 8, prompt_len]; response
    budgets AT_CAP at the cap, the rest exponential with mean cap / 6, within [1, cap]."""
    g = torch.Generator().manual_seed(0)
    cap, rows = args.new_tokens, []
    for index in range(args.batch):
        length = int(
            torch.randint(max(1, args.prompt_len // 8), args.prompt_len + 1, (1,), generator=g)
        )
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        at_cap = float(torch.rand(1, generator=g)) < AT_CAP
        drawn = float(torch.empty(1).exponential_(6 / cap, generator=g))
        budget = cap if at_cap else min(cap, max(1, round(drawn)))
        rows.append(Row(prompt, row_key(0, index, 0), budget))
    return rows


Timing = tuple[float, float, list]
"""Wall seconds, this process's CPU seconds, and the tokens of each row."""


def decode_seconds(engine: EmbeddedEngine, rows: list[Row], continuous: bool) -> Timing:
    """One decode of ``rows`` (device synchronised)."""
    synchronize()
    begin, cpu = time.perf_counter(), time.process_time()
    decoded = engine.decode(rows, SamplingParams(max_new_tokens=1), continuous)
    synchronize()
    return time.perf_counter() - begin, time.process_time() - cpu, [d.tokens for d in decoded]


def warm_up(engine: EmbeddedEngine, rows: list[Row], continuous: bool) -> None:
    """A few rows on the CPU; all of them on CUDA, capturing every graph the runs replay."""
    decode_seconds(engine, rows if torch.cuda.is_available() else rows[:4], continuous)


def engine_process(args, rows, kv_cache_gb, commands, results, slot) -> None:
    """One engine at 1 thread: build, warm up, then time its rows on each command."""
    torch.set_num_threads(1)
    engine = build_engine(args, kv_cache_gb)
    warm_up(engine, rows, True)
    results.put((slot, 0.0, 0.0, None))
    while commands.get() is not None:
        results.put((slot, *decode_seconds(engine, rows, True)))


class EngineProcesses:
    """Persistent engine processes (spawned), each with its rows; :meth:`run` times one
    decode in a set of them started together: its seconds are the slowest one's."""

    def __init__(self, args, shares: list[list[Row]], kv_cache_gb: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in shares]
        self.processes = [
            context.Process(
                target=engine_process,
                args=(args, share, kv_cache_gb, self.commands[i], self.results, i),
            )
            for i, share in enumerate(shares)
        ]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self.results.get()

    def run(self, members: list[int]) -> Timing:
        """The slowest member's wall seconds, the members' CPU seconds together."""
        for member in members:
            self.commands[member].put(True)
        outcome = sorted(self.results.get() for _ in members)
        tokens = [t for *_, ts in outcome for t in ts]
        return max(o[1] for o in outcome), sum(o[2] for o in outcome), tokens

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for process in self.processes:
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"an engine process failed (exit status {process.exitcode})")


def round_robin(runs: dict[str, Callable[[], Timing]], rounds: int) -> dict[str, Timing]:
    """Each run once per round, in turn (so load changes hit them alike): the fastest of
    each."""
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            timing = run()
            if name not in best or timing[0] < best[name][0]:
                best[name] = timing
    return best


def long_tail(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # one engine = one core, as each of the 2 engine processes
    probe = build_engine(args, kv_cache_gb=1.0)
    positions = args.prompt_len + args.new_tokens
    kv_cache_gb = args.slots * probe.decoder.kv_bytes(1, positions) / 2**30
    engine = build_engine(args, kv_cache_gb)
    assert engine.slots(positions) == args.slots
    rows = long_tail_rows(args, engine.vocab_size)
    budgets = [r.budget for r in rows]
    tokens = sum(budgets)
    warm_up(engine, rows, False)
    warm_up(engine, rows, True)
    runs = {
        "static": lambda: decode_seconds(engine, rows, False),
        "continuous": lambda: decode_seconds(engine, rows, True),
    }
    processes = None
    if args.engines == 2:
        half = len(rows) // 2
        processes = EngineProcesses(args, [rows, rows[:half], rows[half:]], kv_cache_gb)
        runs["1 engine"] = lambda: processes.run([0])
        runs["2 engines"] = lambda: processes.run([1, 2])
    best = round_robin(runs, args.repeats)
    if processes is not None:
        processes.close()
    if len({str(timing[2]) for timing in best.values()}) != 1:
        raise RuntimeError(f"the runs gave different tokens: {list(best)}")

    describe(args, engine)
    prompt_lengths = [len(r.prompt) for r in rows]
    print(
        f"long-tail batch: {len(rows)} rows, prompts {min(prompt_lengths)}-{max(prompt_lengths)} "
        f"tokens (mean {statistics.mean(prompt_lengths):.0f}); responses: cap {args.new_tokens}, "
        f"mean {statistics.mean(budgets):.1f} = {statistics.mean(budgets) / args.new_tokens:.1%} "
        f"of the cap, {budgets.count(args.new_tokens) / len(rows):.1%} at the cap; "
        f"{args.slots} KV-cache slots ({kv_cache_gb * 2**10:.1f} MiB)"
    )
    print(
        f"seconds: best of {args.repeats} rounds, the runs of a round in turn; CPU s: of every "
        "engine process (near seconds x engines when each had a core); tokens/s = generated "
        "tokens / seconds"
    )
    print()
    print("| batching | engines | threads each | seconds | CPU s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    threads = torch.get_num_threads()
    rows_printed = [("static", "static", 1, threads), ("continuous", "continuous", 1, threads)]
    if args.engines == 2:
        rows_printed += [("1 engine", "continuous", 1, 1), ("2 engines", "continuous", 2, 1)]
    for name, batching, count, each in rows_printed:
        seconds, cpu, _ = best[name]
        rate = tokens / seconds
        print(f"| {batching} | {count} | {each} | {seconds:.4g} | {cpu:.4g} | {rate:.1f} |")
    static, continuous = best["static"][0], best["continuous"][0]
    engines = "-"
    if args.engines == 2:
        engines = f"{best['1 engine'][0] / best['2 engines'][0]:.2f}x"
    print()
    print(f"continuous batching speed-up: {static / continuous:.2f}x; 2 engines vs 1: {engines}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.long_tail:
        long_tail(args)
    else:
        fixed_batch(args)


if __name__ == "__main__":
    main()
