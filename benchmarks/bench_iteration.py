"""One RL iteration broken down by phase, SFPO beside GRPO, on a random Qwen2 model of a preset
shape (see bench_actor.py for the shape flags) with the embedded rollout engine.

Both runs train the same config except ``algorithm.name`` (SFPO without the entropy switch):
--prompts x --samples rollouts of --response-len tokens per iteration from random prompts of
--prompt-len tokens (no stop token is likely, so responses run to full length), a reward that
varies within groups, no dynamic sampling, evaluation or checkpoints. Phase times come from
each run's metrics.jsonl, as means over the iterations after --warmup; the SFPO rows split
its update into snapshot, fast passes, reposition and slow pass.

    python benchmarks/bench_iteration.py --preset 0.5b --prompts 32 --samples 8 \\
        --prompt-len 256 --response-len 1024 --micro-batch-size 4
    python benchmarks/bench_iteration.py --preset tiny --prompts 4 --samples 2 --iterations 2

With ``--off-policy 1`` it measures the overlap of rollouts with training instead
(``train.off_policy_steps``): the rollouts come from the embedded engine's HTTP server in a
process of its own (``rollout.engine: servers``), the trainer runs in another, each at one
thread on the CPU, and every algorithm runs with 0 and with 1 step off-policy. It prints each
run's seconds per iteration, its phases, the rollout share of the sequential SFPO iteration
and the overlap (sum of the phases / wall-clock); the last line is the speed-up. Sizes left
out default to ones whose rollout phase is about half of a sequential SFPO iteration on the
2-core CPU:

    python benchmarks/bench_iteration.py --off-policy 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from bench_actor import add_shape_args, device_name, resolve_dtype, shape_from_args, write_hf_config

from sfpo_megatron.training.metrics import read_metrics

REWARD = '''def parity(response, answer, source):
    """Random-looking but deterministic: groups are rarely uniform, so advantages are not 0."""
    return float(sum(map(len, response.split())) % 2)
'''
OVERLAP_PHASES = ("time_rollout", "time_reward", "time_old_logprobs", "time_update", "time_sync")
# (label, metric); SFPO's fast passes are shown without the snapshot.
PHASES = [
    ("rollout", "time_rollout"),
    ("reward", "time_reward"),
    ("old log-probs", "time_old_logprobs"),
    ("update: snapshot", "time_snapshot"),
    ("update: fast passes", "fast_passes"),
    ("update: reposition", "time_reposition"),
    ("update: slow pass (GRPO: its one pass)", "slow_pass"),
    ("weight sync", "time_sync"),
    ("whole iteration", "seconds"),
]


SIZES = dict(
    prompts=32, samples=8, prompt_len=256, response_len=1024, micro_batch_size=4, iterations=4
)
OFF_POLICY_SIZES = dict(
    prompts=8, samples=4, prompt_len=16, response_len=64, micro_batch_size=4, iterations=6
)
"""The overlap comparison's defaults: a rollout phase of about half a sequential SFPO
iteration with the tiny preset on the 2-core CPU."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--prompts", type=int, help="prompts per iteration")
    parser.add_argument("--samples", type=int, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--response-len", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per pass")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--warmup", type=int, default=1, help="first iterations left out")
    parser.add_argument("--off-policy", type=int, choices=[0, 1], default=0)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: tmp)")
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = parser.parse_args(argv)
    sizes = OFF_POLICY_SIZES if args.off_policy else SIZES
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.iterations <= args.warmup:
        parser.error("--iterations must exceed --warmup")
    if args.prompts % args.mini_batches:
        parser.error("--prompts must be a multiple of --mini-batches")
    return args


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one word per id ("t2" ...), <pad> = 0 and <eos> = 1. Not
    beside the model's config.json: transformers would load it as Qwen2's tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>"] + [f"t{i}" for i in range(2, vocab_size)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(words[:2])
    directory.mkdir(parents=True, exist_ok=True)
    core.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "unk_token": "<pad>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


def write_task(args: argparse.Namespace, vocab_size: int, directory: Path) -> Path:
    """Model config, tokenizer, prompts and reward in ``directory``; returns the run config."""
    write_hf_config(shape_from_args(args), directory, args.prompt_len + args.response_len + 8)
    save_tokenizer(directory / "tokenizer", vocab_size)
    rng = random.Random(0)
    rows = [
        {"prompt": " ".join(f"t{rng.randrange(2, vocab_size)}" for _ in range(args.prompt_len))}
        | {"answer": ""}
        for _ in range(4 * args.prompts)
    ]
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "reward.py").write_text(REWARD)
    config = {
        "model": {
            "hf_config": str(directory),
            "load_weights": False,
            "dtype": resolve_dtype(args.dtype),
        },
        "train": {
            "iterations": args.iterations,
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "mini_batch_prompts": args.prompts // args.mini_batches,
            "micro_batch_size": args.micro_batch_size,
        },
        "algorithm": {"sfpo": {"switch_to_grpo": False}},
        "rollout": {"max_response_length": args.response_len},
        "data": {
            "train_files": [str(directory / "prompts.jsonl")],
            "tokenizer": str(directory / "tokenizer"),
            "use_chat_template": False,
            "max_prompt_length": args.prompt_len,
        },
        "reward": {"fn": f"{directory / 'reward.py'}:parity", "workers": 1},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def phase_means(directory: Path, warmup: int) -> dict[str, float]:
    """Mean of each phase over the iterations after ``warmup`` (SFPO's fast passes without
    its snapshot; GRPO's one pass as its slow pass)."""
    records = [r for r in read_metrics(directory / "metrics.jsonl") if "seconds" in r]
    records = records[warmup:]
    means = {}
    for key in {k for r in records for k in r}:
        values = [r[key] for r in records if isinstance(r.get(key), int | float)]
        if values:
            means[key] = sum(values) / len(values)
    if "time_fast" in means:
        means["fast_passes"] = means["time_fast"] - means.get("time_snapshot", 0.0)
        means["slow_pass"] = means["time_slow"]
    else:
        means["slow_pass"] = means["time_update"]
    return means


def train_with_server(
    config: Path, directory: Path, overrides: list[str], hf_dir: Path | None = None
) -> None:
    """One training run whose rollouts come from an embedded-engine server process (both at
    one thread) serving the model at ``hf_dir`` (default: the config's directory)."""
    from sfpo_megatron.launch.parallel import free_port
    from sfpo_megatron.rollout.launcher import ServerProcess, embedded_command

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = embedded_command(str(hf_dir or config.parent), port)
    os.environ["OMP_NUM_THREADS"] = "1"  # the server process's environment is this one's
    server = ServerProcess(command, url, directory / "server.log", 120, request_timeout_s=600)
    server.start()
    try:
        servers = [
            "rollout.engine=servers",
            f"rollout.server_urls=[{url}]",
            "rollout.sync_address=127.0.0.1",
            f"rollout.sync_port={free_port()}",
        ]
        command = [sys.executable, "-m", "sfpo_megatron.cli", "train", str(config)]
        command += [f"logging.output_dir={directory}", *servers, *overrides]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    finally:
        server.stop()


def compare_off_policy(args: argparse.Namespace, config: Path, out: Path) -> None:
    """Each algorithm with 0 and 1 step off-policy, rollouts from a server process."""
    means = {}
    for algorithm in ("sfpo", "grpo"):
        for steps in (0, 1):
            directory = out / f"{algorithm}_off_policy_{steps}"
            overrides = [f"algorithm.name={algorithm}", f"train.off_policy_steps={steps}"]
            train_with_server(config, directory, overrides + args.overrides)
            means[algorithm, steps] = phase_means(directory, args.warmup)
    sequential = means["sfpo", 0]
    share = sequential["time_rollout"] / sequential["seconds"]
    print(f"rollout phase of a sequential SFPO iteration: {100 * share:.1f}%")
    print()
    print(
        "| run | s/iteration | rollout s | reward s | old log-probs s | update s | sync s "
        "| waited for rollouts s | overlap |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (algorithm, steps), m in means.items():
        phases = [m.get(key, 0.0) for key in OVERLAP_PHASES]
        print(
            f"| {algorithm.upper()}, off_policy_steps={steps} | {m['seconds']:.3f} | "
            + " | ".join(f"{p:.3f}" for p in phases)
            + f" | {m.get('time_rollout_wait', 0.0):.3f} | {sum(phases) / m['seconds']:.2f} |"
        )
    speedups = {a: means[a, 0]["seconds"] / means[a, 1]["seconds"] for a in ("sfpo", "grpo")}
    print(
        f"off-policy overlap speed-up: {speedups['sfpo']:.2f}x (SFPO), "
        f"{speedups['grpo']:.2f}x (GRPO)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = shape_from_args(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_iteration_"))
    out.mkdir(parents=True, exist_ok=True)
    config = write_task(args, shape.vocab, out)
    print(f"device: {device_name()}, torch {torch.__version__}")
    print(f"model: preset {args.preset} {shape}, dtype {resolve_dtype(args.dtype)}")
    print(
        f"iteration: {args.prompts} prompts x {args.samples} samples, prompts of "
        f"{args.prompt_len} tokens, responses up to {args.response_len}; {args.mini_batches} "
        f"optimizer steps per pass, micro-batches of {args.micro_batch_size}; means over "
        f"iterations {args.warmup + 1}-{args.iterations}; runs in {out}"
    )
    if args.off_policy:
        compare_off_policy(args, config, out)
        return
    means = {}
    for algorithm in ("grpo", "sfpo"):
        directory = out / algorithm
        command = [sys.executable, "-m", "sfpo_megatron.cli", "train", str(config)]
        command += [f"algorithm.name={algorithm}", f"logging.output_dir={directory}"]
        subprocess.run(command + args.overrides, check=True, stdout=subprocess.DEVNULL)
        means[algorithm] = phase_means(directory, args.warmup)

    print()
    print("| phase | GRPO ms | SFPO ms | % of SFPO iteration |")
    print("|---|---:|---:|---:|")
    sfpo_total = means["sfpo"]["seconds"]
    for label, key in PHASES:
        cells = [f"{1e3 * means[a][key]:.1f}" if key in means[a] else "-" for a in ("grpo", "sfpo")]
        share = f"{100 * means['sfpo'][key] / sfpo_total:.2f}" if key in means["sfpo"] else "-"
        print(f"| {label} | {cells[0]} | {cells[1]} | {share} |")
    own = means["sfpo"].get("time_snapshot", 0.0) + means["sfpo"]["time_reposition"]
    print()
    print(
        f"SFPO's own cost (snapshot + reposition): {100 * own / sfpo_total:.2f}% of its iteration"
    )


if __name__ == "__main__":
    main()
