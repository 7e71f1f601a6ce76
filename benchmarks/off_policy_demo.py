"""One step off-policy against on-policy on the demo task: final eval accuracy at the same
rollout budget, over seeds (issue 19).

    python benchmarks/off_policy_demo.py --seeds 1 2 --out runs/off_policy [key=value ...]

Trains ``examples/configs/demo.yaml`` once per (setting, seed), ``model.seed`` and
``data.seed`` set to the seed, dynamic sampling off (every run generates the same number of
rollouts), the rollouts coming from the embedded engine's server in a process of its own
(``rollout.engine: servers``) for both settings. ``--off KEY=VALUE`` (repeatable) overrides
the off-policy runs only, for example ``--off algorithm.rollout_correction=tis``; the trailing
overrides go to every run. A finished run's directory is reused, so an interrupted comparison
goes on where it stopped. Last line: ``off-policy demo accuracy: XX% of on-policy (seeds ...)``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench_iteration import train_with_server
from sfpo_vs_grpo import DEMO, REPO, seed_overrides

from sfpo_megatron.config import load_config
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.training.metrics import read_metrics

SETTINGS = {"on-policy": ["train.off_policy_steps=0"], "off-policy": ["train.off_policy_steps=1"]}


def train_demo(directory: Path, seed: int, overrides: list[str]) -> list[dict]:
    """The run's metrics records, training it first unless it finished before."""
    records = finished_records(directory)
    if records is None:
        shutil.rmtree(directory, ignore_errors=True)
        overrides = [*seed_overrides(seed), "train.dynamic_sampling=false", *overrides]
        hf_dir = hf_directory(load_config(DEMO).model.hf_config)
        train_with_server(DEMO, directory, overrides, hf_dir)
        records = read_metrics(directory / "metrics.jsonl")
    return records


def finished_records(directory: Path) -> list[dict] | None:
    """The metrics records of the run in ``directory`` if it evaluated its last iteration
    (its config.json says which), else None."""
    config, metrics = directory / "config.json", directory / "metrics.jsonl"
    if not (config.exists() and metrics.exists()):
        return None
    last = json.loads(config.read_text())["train"]["iterations"]
    records = read_metrics(metrics)
    done = any(r.get("iteration") == last and "eval/macro" in r for r in records)
    return records if done else None


def summary(records: list[dict]) -> dict[str, float]:
    """Final eval accuracy (avg@k macro), the mean rollout log-prob gap and the training
    seconds (iterations only, without evaluations)."""
    evals = [r["eval/macro"] for r in records if "eval/macro" in r]
    if not evals:
        raise SystemExit("a run without evaluations (eval.interval: 0) has no final accuracy")
    trained = [r for r in records if "seconds" in r]
    gaps = [r["rollout_logprob_gap"] for r in trained]
    return {
        "final": evals[-1],
        "gap": sum(gaps) / len(gaps),
        "seconds": sum(r["seconds"] - r.get("time_eval", 0.0) for r in trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "off_policy")
    parser.add_argument(
        "--off", action="append", default=[], metavar="KEY=VALUE", help="off-policy runs only"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for name, setting in SETTINGS.items():
        extra = setting + (args.off if name == "off-policy" else []) + args.overrides
        for seed in args.seeds:
            records = train_demo(args.out / f"{name}-{seed}", seed, extra)
            results[name, seed] = summary(records)
            print(f"{name} seed {seed}: final eval {results[name, seed]['final']:.3f}", flush=True)
    seed_columns = " | ".join(f"seed {s} final eval" for s in args.seeds)
    print(f"\n| run | {seed_columns} | mean | % of on-policy | log-prob gap | training s |")
    print("|---|" + "---:|" * (len(args.seeds) + 4))
    means = {}
    for name in SETTINGS:
        rows = [results[name, s] for s in args.seeds]
        means[name] = sum(r["final"] for r in rows) / len(rows)
        finals = " | ".join(f"{r['final']:.3f}" for r in rows)
        gap = sum(r["gap"] for r in rows) / len(rows)
        seconds = sum(r["seconds"] for r in rows) / len(rows)
        share = percent(means[name], means["on-policy"])
        print(f"| {name} | {finals} | {means[name]:.3f} | {share} | {gap:.3g} | {seconds:.0f} |")
    share = percent(means["off-policy"], means["on-policy"])
    seeds = " ".join(map(str, args.seeds))
    print(f"\noff-policy demo accuracy: {share} of on-policy (seeds {seeds})")


def percent(value: float, reference: float) -> str:
    """``value`` as a share of ``reference`` (n/a when the on-policy runs solved nothing)."""
    return f"{100 * value / reference:.0f}%" if reference > 0 else "n/a"


if __name__ == "__main__":
    main()
