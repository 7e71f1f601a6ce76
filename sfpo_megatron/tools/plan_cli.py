"""``sfpo-megatron plan``: the per-GPU memory of one layout, or the layouts that fit, as tables
(the numbers come from :mod:`sfpo_megatron.tools.plan`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import Config, load_config
from sfpo_megatron.models.arch import UnsupportedModelError, read_hf_config
from sfpo_megatron.tools.plan import (
    COMPONENTS,
    DTYPE_BYTES,
    GIB,
    MemoryPlan,
    model_parameters,
    plan_memory,
    search_layouts,
)


def _table(title: str, names: list[str], rows: list[tuple[str, list[int]]]) -> list[str]:
    """Rows of GiB values under right-aligned column names."""
    width = max(len(title), *(len(label) for label, _ in rows)) + 2
    lines = [title.ljust(width) + "".join(f"{name:>14}" for name in names)]
    for label, values in rows:
        lines.append(label.ljust(width) + "".join(f"{v / GIB:14.2f}" for v in values))
    return lines


def format_plan(plan: MemoryPlan, usable_bytes: int) -> str:
    """Per component: the first and last stage (each its largest DP rank) and the largest
    value any rank has; the largest rank total decides whether the layout fits."""
    stages = sorted({0, plan.cfg.parallel.pipeline - 1})
    columns = [plan.stage(s) for s in stages]
    names = ["stage 0", "last stage"][: len(stages)] + ["max of ranks"]
    rows = [(c, [r.bytes[c] for r in columns] + [plan.worst(c)]) for c in COMPONENTS]
    worst = plan.worst_rank
    rows.append(("total", [r.total for r in columns] + [worst.total]))
    headroom = usable_bytes - worst.total
    verdict = "fits" if headroom >= 0 and not plan.problems else "does NOT fit"
    verdict = (
        f"worst rank: stage {worst.stage}, DP rank {worst.data_rank}: {worst.total / GIB:.2f} "
        f"of {usable_bytes / GIB:.2f} GiB usable -> {verdict} (headroom {headroom / GIB:.2f} GiB)"
    )
    problems = [f"problem: {problem}" for problem in plan.problems]
    return "\n".join(_table("GiB per GPU", names, rows) + [verdict] + problems)


def format_search(plans: list[MemoryPlan], usable_bytes: int) -> str:
    """One row per layout: its largest rank's total, headroom, model states (weights,
    gradients, optimizer, snapshot) and activations + logits."""
    rows = []
    for plan in plans:
        w = plan.worst_rank
        states = sum(w.bytes[c] for c in COMPONENTS[:5])
        acts = w.bytes["activations"] + w.bytes["logits"]
        rows.append((plan.describe(), [w.total, usable_bytes - w.total, states, acts]))
    names = ["worst rank", "headroom", "model states", "activations"]
    return "\n".join(_table("layout (GiB per GPU)", names, rows))


_BOOL = {"action": argparse.BooleanOptionalAction}
_FLAGS = {  # flag -> (the config key it sets, argparse options); unset flags keep the config's
    "tensor": ("parallel.tensor", {"type": int}),
    "pipeline": ("parallel.pipeline", {"type": int}),
    "virtual-pipeline": ("parallel.virtual_pipeline", {"type": int}),
    "data": ("parallel.data", {"type": int}),
    "sequence-parallel": ("parallel.sequence_parallel", _BOOL),
    "distributed-optimizer": ("parallel.distributed_optimizer", _BOOL),
    "overlap-grad-reduce": ("parallel.overlap_grad_reduce", _BOOL),
    "recompute": ("model.recompute_activations", _BOOL),
    "dtype": ("model.dtype", {"choices": sorted(DTYPE_BYTES)}),
    "micro-batch-size": ("train.micro_batch_size", {"type": int}),
    "snapshot": ("algorithm.sfpo.snapshot", {"choices": ["gpu", "host"]}),
}
_LAYOUT = ("tensor", "pipeline", "virtual_pipeline", "data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's arguments."""
    parser.add_argument(
        "model_config",
        help="HF checkpoint directory / config.json, or a run YAML (its layout and batch)",
    )
    for flag, (key, options) in _FLAGS.items():
        parser.add_argument(f"--{flag}", help=f"sets {key}", **options)
    parser.add_argument(
        "--seq-length",
        type=int,
        help="tokens per sequence (default: data.max_prompt_length + rollout.max_response_length)",
    )
    parser.add_argument(
        "--attention",
        choices=["flash", "local"],
        default="flash",
        help="flash: Transformer Engine's fused attention; local: Megatron's local spec "
        "(no TE), which materialises S x S scores",
    )
    parser.add_argument(
        "--rollout-fraction",
        type=float,
        default=0.0,
        help="GPU memory fraction of a colocated rollout engine (weights + KV cache); 0 = none",
    )
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (world size)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GiB")
    parser.add_argument(
        "--reserve-gb",
        type=float,
        default=2.0,
        help="GiB per GPU kept free for what is not modelled (CUDA context, NCCL, fragments)",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="list the layouts that fit (the default when neither a layout flag nor a run "
        "YAML is given)",
    )


def _load(args: argparse.Namespace, run_yaml: bool) -> Config:
    """The run config: a YAML file, or defaults around an HF config, with the flags applied."""
    overrides = [
        f"{key}={value}"
        for flag, (key, _) in _FLAGS.items()
        if (value := getattr(args, flag.replace("-", "_"))) is not None
    ]
    if run_yaml:
        return load_config(args.model_config, overrides)
    return load_config(None, [f"model.hf_config={Path(args.model_config).resolve()}", *overrides])


def run(args: argparse.Namespace) -> int:
    """Print the plan of the given layout, or the layouts that fit; 0 when it fits (some
    do), 1 when not, 2 for an invalid config or layout."""
    run_yaml = Path(args.model_config).suffix in (".yaml", ".yml")
    try:
        cfg = _load(args, run_yaml)
        arch = read_hf_config(cfg.model.hf_config)
        if not 0 <= args.rollout_fraction < 1:
            raise ConfigError(f"--rollout-fraction={args.rollout_fraction} must be in [0, 1)")
        if not 0 <= args.reserve_gb < args.gpu_gb:
            raise ConfigError(f"--reserve-gb={args.reserve_gb} must be in [0, --gpu-gb)")
        gpu_bytes = int(args.gpu_gb * GIB)
        usable = gpu_bytes - int(args.reserve_gb * GIB)
        options = dict(
            seq_length=args.seq_length or cfg.longest_sequence,
            flash_attention=args.attention == "flash",
            rollout_fraction=args.rollout_fraction,
            gpu_bytes=gpu_bytes,
        )
        print(
            f"{Path(cfg.model.hf_config).name}: {model_parameters(arch) / 1e6:,.0f} M params, "
            f"{args.gpus} GPUs x {args.gpu_gb:g} GiB ({args.reserve_gb:g} reserved), "
            f"{args.attention} attention"
        )
        layout_given = run_yaml or any(getattr(args, name) is not None for name in _LAYOUT)
        if args.search or not layout_given:
            plans = search_layouts(cfg, arch, args.gpus, usable, **options)
            if not plans:
                print(f"no layout of {args.gpus} GPUs fits in {usable / GIB:.2f} GiB per GPU")
                return 1
            print(format_search(plans, usable))
            return 0
        plan = plan_memory(cfg, arch, args.gpus, **options)
    except (ConfigError, UnsupportedModelError, FileNotFoundError) as error:
        print(f"sfpo-megatron plan: {error}", file=sys.stderr)
        return 2
    print(plan.describe())
    print(format_plan(plan, usable))
    return 0 if plan.worst_rank.total <= usable and not plan.problems else 1
