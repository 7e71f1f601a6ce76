"""Bandwidth of SFPO's reposition_ and snapshot_ against plain copies and a two-op torch baseline.

The ops are memory-bound, so each row is judged against copies measured in the same run: the
device-to-device fp32 copy_ (what a fused pass can hope to reach) and, for host rows, a pinned
copy in the same direction over the host link. See BENCHMARKS.md for the counting rules.

    python benchmarks/bench_reposition.py                          # CUDA if available
    python benchmarks/bench_reposition.py --device cpu --elements 20000000 --check
"""

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sfpo_megatron import ops
from sfpo_megatron.ops import _fallback
from sfpo_megatron.ops.host_stream import DEFAULT_CHUNK_ELEMENTS

MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COUNTING_RULE = (
    "bytes/element: every fp32 element read or written counts 4 B, every model element written "
    "its size (2 B bf16/fp16, 4 B fp32); host rows count only the 4 B/element crossing the "
    "host link. ms: median over repeats after warm-up. GB/s = elements x bytes/element / time."
)
BASELINE = "torch lerp_ + copy_ (baseline)"
COLUMNS = [
    ("name", "<34"),
    ("elements", ">11"),
    ("B/elem", ">8"),
    ("ms", ">10"),
    ("GB/s", ">9"),
    ("% d2d copy", ">12"),
    ("% pinned copy", ">15"),
]


@dataclass
class Row:
    """One measurement, shown as a share of the bandwidth of the reference copy of its kind."""

    name: str
    bytes_per_element: int
    ms: float
    compared_with: str  # "d2d", "h2d" or "d2h": the copy of that kind marked is_reference
    is_reference: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults pick CUDA with 2^29 elements, or the CPU with 2^24."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--elements", type=int, default=None, help="2^29 on CUDA, 2^24 on CPU")
    parser.add_argument("--tensors", type=int, default=1, help="split the elements over N tensors")
    parser.add_argument("--model-dtype", choices=sorted(MODEL_DTYPES), default="bf16")
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--host-chunk", type=int, default=DEFAULT_CHUNK_ELEMENTS, help="reposition_from_host_"
    )
    parser.add_argument("--check", action="store_true", help="ours vs the fallback, bitwise")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.elements is None:
        args.elements = 1 << 29 if args.device == "cuda" else 1 << 24
    if not 1 <= args.tensors <= args.elements:
        parser.error("--tensors must be between 1 and --elements")
    return args


def split_sizes(elements: int, tensors: int) -> list[int]:
    """Near-equal sizes summing to elements (the first ones one larger)."""
    base, extra = divmod(elements, tensors)
    return [base + (i < extra) for i in range(tensors)]


class Timer:
    """Median milliseconds of callables: CUDA events on the GPU, perf_counter on the CPU.

    The callables are timed round-robin (one run of each per round), so that load changes on a
    shared machine hit every row alike and the ratios between rows stay meaningful.
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.cuda = device.type == "cuda"
        self.repeats, self.warmup = repeats, warmup

    def once(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fns: list[Callable[[], object]]) -> list[float]:
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        if self.cuda:
            torch.cuda.synchronize()
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(self.repeats):
            for fn, fn_times in zip(fns, times, strict=True):
                fn_times.append(self.once(fn))
        return [statistics.median(fn_times) for fn_times in times]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality of two tensor lists (sees -0 and NaN encodings)."""
    ints = {4: torch.int32, 2: torch.int16}
    return all(
        torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))
        for x, y in zip(a, b, strict=True)
    )


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def check(
    mains: list[torch.Tensor],
    flat: torch.Tensor,
    models: list[torch.Tensor],
    scratch: torch.Tensor,
    host_flat: torch.Tensor | None,
    alpha: float,
    chunk: int,
) -> None:
    """Ours (ops.*) against the pure-torch fallback on the benchmark data, bit for bit."""
    snaps = ops.snapshot_views(flat, mains)
    results = {}
    for name, fn in (("ours", ops.reposition_), ("fallback", _fallback.reposition_)):
        main, model = clones(mains), clones(models)
        fn(main, snaps, model, alpha)
        results[name] = main + model
    verdicts = {"reposition_": same_bits(results["ours"], results["fallback"])}
    ops.snapshot_(mains, scratch)
    expected = torch.empty_like(scratch)
    _fallback.snapshot_(mains, expected)
    verdicts["snapshot_"] = same_bits([scratch], [expected])
    if host_flat is not None:
        ops.snapshot_(mains, host_flat)
        torch.cuda.synchronize()
        verdicts["snapshot_ to host"] = same_bits([host_flat], [expected.cpu()])
        host_flat.copy_(flat)
        main, model = clones(mains), clones(models)
        ops.reposition_from_host_(main, host_flat, model, alpha, chunk)
        verdicts["reposition_from_host_"] = same_bits(main + model, results["fallback"])
    for name, ok in verdicts.items():
        print(f"check: {name:<22} ours == torch fallback bitwise: {'ok' if ok else 'MISMATCH'}")
    if not all(verdicts.values()):
        raise SystemExit("check failed")


def measure(args: argparse.Namespace) -> list[Row]:
    """Build the data on the chosen device and time every row."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n, alpha = args.elements, args.alpha
    model_dtype = MODEL_DTYPES[args.model_dtype]
    model_bytes = torch.empty(0, dtype=model_dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    mains = [torch.randn(k, device=device, generator=g) for k in split_sizes(n, args.tensors)]
    flat = torch.randn(n, device=device, generator=g)  # the snapshot reposition_ reads
    snaps = ops.snapshot_views(flat, mains)
    models = [m.to(model_dtype) for m in mains]
    scratch = torch.empty(n, device=device)
    host_flat = torch.empty(n, pin_memory=True) if cuda else None
    if host_flat is not None:
        host_flat.copy_(flat)
    if args.check:
        check(mains, flat, models, scratch, host_flat, alpha, args.host_chunk)

    def baseline() -> None:
        # lerp_(snap, w) computes main + w * (snap - main): w = 1 - alpha is the same update.
        torch._foreach_lerp_(mains, snaps, 1.0 - alpha)
        torch._foreach_copy_(models, mains)

    def from_host() -> None:
        ops.reposition_from_host_(mains, host_flat, models, alpha, args.host_chunk)

    # (name, bytes/element, compared with, reference?, what to time)
    cases = [
        ("copy_ fp32 d2d", 8, "d2d", True, lambda: scratch.copy_(flat)),
        (
            "reposition_ (ours)",
            12 + model_bytes,
            "d2d",
            False,
            lambda: ops.reposition_(mains, snaps, models, alpha),
        ),
        (BASELINE, 16 + model_bytes, "d2d", False, baseline),
        ("snapshot_ same device", 8, "d2d", False, lambda: ops.snapshot_(mains, scratch)),
    ]
    if host_flat is not None:
        cases += [
            (
                "copy_ pinned H2D",
                4,
                "h2d",
                True,
                lambda: scratch.copy_(host_flat, non_blocking=True),
            ),
            (
                "copy_ pinned D2H",
                4,
                "d2h",
                True,
                lambda: host_flat.copy_(scratch, non_blocking=True),
            ),
            ("snapshot_ to pinned host", 4, "d2h", False, lambda: ops.snapshot_(mains, host_flat)),
            ("reposition_from_host_", 4, "h2d", False, from_host),
        ]
    timer = Timer(device, args.repeats, args.warmup)
    ms = timer([fn for *_, fn in cases])
    return [
        Row(name, bpe, t, ref, is_ref)
        for (name, bpe, ref, is_ref, _), t in zip(cases, ms, strict=True)
    ]


def print_header(args: argparse.Namespace) -> None:
    """What ran where, so a pasted table is self-describing."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"backend: {ops.backend(args.device)}")
    print(
        f"elements: {args.elements} in {args.tensors} tensor(s), model dtype {args.model_dtype}, "
        f"alpha {args.alpha}, repeats {args.repeats} (warm-up {args.warmup})"
    )
    print(COUNTING_RULE)


def format_line(values: list[object]) -> str:
    return "".join(f"{v:{spec}}" for v, (_, spec) in zip(values, COLUMNS, strict=True))


def print_table(args: argparse.Namespace, rows: list[Row]) -> None:
    """The table, then the speed-up over the baseline."""
    n = args.elements
    gbps = {row.name: n * row.bytes_per_element / (row.ms * 1e6) for row in rows}
    references = {row.compared_with: gbps[row.name] for row in rows if row.is_reference}
    print()
    print(format_line([title for title, _ in COLUMNS]))
    for row in rows:
        share = f"{100 * gbps[row.name] / references[row.compared_with]:.1f}%"
        on_device = row.compared_with == "d2d"
        name = row.name + (" (reference)" if row.is_reference else "")
        values = [name, n, row.bytes_per_element, f"{row.ms:.3f}", f"{gbps[row.name]:.1f}"]
        print(format_line(values + ([share, "-"] if on_device else ["-", share])))
    ms = {row.name: row.ms for row in rows}
    speedup = ms[BASELINE] / ms["reposition_ (ours)"]
    print(f"\nspeed-up of reposition_ over the torch baseline (time ratio): {speedup:.2f}x")
    if args.device == "cpu":
        print(
            "host rows skipped: they need CUDA (on the CPU reposition_from_host_ is reposition_)."
        )
    else:
        print("% pinned copy: against the pinned copy in the same direction (D2H or H2D).")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark from the command line."""
    args = parse_args(argv)
    print_header(args)
    print_table(args, measure(args))


if __name__ == "__main__":
    main()
