"""SFPO against GRPO on the demo task, several seeds each, the same rollout budget.

    python benchmarks/sfpo_vs_grpo.py --seeds 1 2 3 --out runs/compare [key=value ...]

Runs ``sfpo-megatron train examples/configs/demo.yaml`` once per (algorithm, seed) with
``model.seed`` and ``data.seed`` set to the seed, then prints per run: the best and final
eval accuracy (avg@k macro), and the rollouts (samples generated) each needed to first reach
GRPO's best eval accuracy of the same seed (evaluations every ``eval.interval`` iterations).
Curves: ``sfpo-megatron plot OUT/grpo-1 OUT/sfpo-1``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from sfpo_megatron.config import load_config
from sfpo_megatron.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "configs" / "demo.yaml"


def seed_overrides(seed: int) -> list[str]:
    """A run's seed: the model's initialisation and the data's order and sampling."""
    return [f"model.seed={seed}", f"data.seed={seed}"]


def run(algorithm: str, seed: int, out: Path, overrides: list[str]) -> Path:
    directory = out / f"{algorithm}-{seed}"
    if not (directory / "metrics.jsonl").exists():
        subprocess.run(
            [sys.executable, "-m", "sfpo_megatron.cli", "train", str(DEMO)]
            + [f"algorithm.name={algorithm}", *seed_overrides(seed)]
            + [f"logging.output_dir={directory}", *overrides],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return directory


def eval_curve(directory: Path, per_round: int) -> list[tuple[int, float]]:
    """(samples generated so far, eval accuracy) at each evaluation; dynamic sampling makes
    an iteration cost ``sampling_rounds`` rounds of rollouts."""
    curve, rollouts = [], 0
    for record in read_metrics(directory / "metrics.jsonl"):
        rollouts += int(record.get("sampling_rounds", 1)) * per_round
        if "eval/macro" in record:
            curve.append((rollouts, record["eval/macro"]))
    return curve


def rollouts_to_reach(curve: list[tuple[int, float]], target: float) -> str:
    return next((str(rollouts) for rollouts, a in curve if a >= target), "not reached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(DEMO, args.overrides)
    per_round = cfg.sequences_per_step
    print("| seed | algorithm | best eval | final eval | rollouts to GRPO's best |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        curves = {
            a: eval_curve(run(a, seed, args.out, args.overrides), per_round)
            for a in ("grpo", "sfpo")
        }
        target = max(accuracy for _, accuracy in curves["grpo"])
        for algorithm, curve in curves.items():
            best, final = max(a for _, a in curve), curve[-1][1]
            reach = rollouts_to_reach(curve, target)
            print(f"| {seed} | {algorithm} | {best:.3f} | {final:.3f} | {reach} |", flush=True)


if __name__ == "__main__":
    main()
