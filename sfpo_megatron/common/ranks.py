"""Which launcher started this process, read from its variables: the one place that knows
torchrun's and Slurm's names for the rank and the world size (process start-up and the log's
rank filter both ask, the log before any process group exists)."""

from __future__ import annotations

from collections.abc import Mapping

LAUNCHER_VARIABLES = {"torchrun": ("RANK", "WORLD_SIZE"), "slurm": ("SLURM_PROCID", "SLURM_NTASKS")}
"""Launcher -> (rank variable, world-size variable), in the order they are looked for."""


def launcher_rank(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    """``(launcher, rank, world size)`` from torchrun's variables, else Slurm's; None for a
    process that no launcher started."""
    for launcher, (rank, world) in LAUNCHER_VARIABLES.items():
        if rank in env and world in env:
            return launcher, int(env[rank]), int(env[world])
    return None
