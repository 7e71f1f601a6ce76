"""Process start-up: torchrun or Slurm environment -> torch.distributed -> Megatron groups."""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sfpo_megatron.config import Config
from sfpo_megatron.config_rules import validate_layout
from sfpo_megatron.models.arch import ModelArch


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """"torchrun", "slurm" or "single"."""


DEFAULT_PORT = 29500


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank layout from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT", _slurm_port(env))),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def _slurm_port(env: dict[str, str]) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    job = env.get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; it may be taken again later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    return torch.cuda.is_available()


def init_distributed(cfg: Config, arch: ModelArch, launch: LaunchEnv | None = None) -> int:
    """Check the layout against the model and world, then start torch.distributed (NCCL on
    GPU, gloo on CPU) and Megatron's TP/PP/VPP/DP groups.

    On CPU this also enables :mod:`sfpo_megatron.cpu_compat`. Returns the data-parallel size.
    """
    from megatron.core import parallel_state

    launch = launch or read_launch_env()
    dp = validate_layout(cfg, arch, launch.world_size)
    if use_cuda():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        from sfpo_megatron import cpu_compat

        cpu_compat.enable()
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        )
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline
        if p.virtual_pipeline and p.virtual_pipeline > 1
        else None,
        distributed_timeout_minutes=max(1, p.timeout_s // 60),
    )
    return dp


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
