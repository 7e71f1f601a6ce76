"""Process start-up: torchrun or Slurm environment -> torch.distributed -> Megatron groups."""

from __future__ import annotations

import datetime
import glob
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sfpo_megatron.common.errors import ConfigError, RolloutError
from sfpo_megatron.common.ranks import launcher_rank
from sfpo_megatron.config import Config, validate_layout
from sfpo_megatron.launch import cpu_compat
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
    found = launcher_rank(env)
    if found is None:
        return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    launcher, rank, world_size = found
    if launcher == "torchrun":
        return LaunchEnv(
            rank=rank,
            world_size=world_size,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher=launcher,
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
        master_port=int(env.get("MASTER_PORT", _slurm_port(env))),
        launcher=launcher,
    )


def _slurm_port(env: dict[str, str]) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    job = env.get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; it may be taken again later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nvidia_gpus_present() -> bool:
    """Whether this machine shows NVIDIA GPUs, whatever torch makes of them: device files,
    the driver's GPU list, or CUDA_VISIBLE_DEVICES naming a device (an index or a UUID)."""
    if glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"):
        return True
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first.isdigit() or first.startswith(("GPU-", "MIG-"))


def choose_backend(requested: str, cuda_available: bool, gpus_present: bool) -> str:
    """The process-group backend for ``parallel.backend``: "nccl" (CUDA) or "gloo" (CPU, with
    the cpu_compat patches). "auto" picks gloo only on a machine without GPUs, so a GPU node
    whose CUDA is broken fails here instead of training on its CPUs."""
    if requested == "nccl" and not cuda_available:
        raise ConfigError(
            "parallel.backend=nccl needs CUDA, but torch.cuda.is_available() is False "
            "(torch built without CUDA, or no usable GPU/driver)"
        )
    if requested == "gloo" and cuda_available:
        raise ConfigError(
            "parallel.backend=gloo runs on the CPU with patches that would corrupt a GPU "
            "run, but CUDA is available here: use parallel.backend=auto or nccl"
        )
    if requested == "auto" and not cuda_available and gpus_present:
        raise ConfigError(
            "parallel.backend=auto: NVIDIA GPUs were found but CUDA is unusable (torch built "
            "without CUDA? driver missing or mismatched?); GPUs seen via /dev/nvidia*, "
            "/proc/driver/nvidia or CUDA_VISIBLE_DEVICES. Fix CUDA, or set "
            "parallel.backend=gloo to force CPU mode"
        )
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    return requested


_cpu_compat_ours = False
"""Whether init_distributed enabled cpu_compat, so that shutdown gives the patches back."""


def init_distributed(cfg: Config, arch: ModelArch, launch: LaunchEnv | None = None) -> int:
    """Check the layout against the model and world, then start torch.distributed (the
    backend from :func:`choose_backend`) and Megatron's TP/PP/VPP/DP groups.

    With gloo this also enables :mod:`sfpo_megatron.launch.cpu_compat` (until :func:`shutdown`).
    Returns the data-parallel size.
    """
    global _cpu_compat_ours
    from megatron.core import parallel_state

    launch = launch or read_launch_env()
    dp = validate_layout(cfg, arch, launch.world_size)
    cuda = torch.cuda.is_available()
    backend = choose_backend(cfg.parallel.backend, cuda, nvidia_gpus_present())
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    elif not cpu_compat.enabled():
        cpu_compat.enable()
        _cpu_compat_ours = True
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
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_size,
        distributed_timeout_minutes=max(1, p.timeout_s // 60),
    )
    return dp


def shutdown() -> None:
    """Tear down Megatron's groups and torch.distributed, and undo the CPU patches if
    :func:`init_distributed` applied them."""
    global _cpu_compat_ours
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _cpu_compat_ours:
        cpu_compat.disable()
        _cpu_compat_ours = False


T = TypeVar("T")


def on_lead(call: Callable[[], T]) -> T:
    """Collective: global rank 0 makes ``call`` and every rank receives what it returned; if it
    fails with :class:`RolloutError`, every rank raises it (no rank is left waiting in a
    collective for a dead server)."""
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = call()
        except RolloutError as failure:
            outcome[0] = failure
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], RolloutError):
        raise RolloutError(str(outcome[0]))
    return outcome[0]
