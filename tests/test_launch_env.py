"""Rank layout from torchrun's and Slurm's environments; the process-group backend."""

from __future__ import annotations

import pytest

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import load_config
from sfpo_megatron.launch import cpu_compat
from sfpo_megatron.launch import parallel as distributed
from sfpo_megatron.launch.parallel import (
    choose_backend,
    first_slurm_host,
    nvidia_gpus_present,
    read_launch_env,
)
from sfpo_megatron.models.arch import read_hf_config

from conftest import write_hf_config


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node7", "node7"),
        ("gpu[003-005,010]", "gpu003"),
        ("gpu[12,14]", "gpu12"),
        ("a[1-2],b[3-4]", "a1"),
        ("cpu1,cpu2", "cpu1"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_torchrun_env_wins():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("n1", 1234, "torchrun")


def test_slurm_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "4242",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 5)
    assert launch.master_addr == "gpu007"
    assert launch.launcher == "slurm"
    assert launch.master_port == 20000 + 4242  # per job, so jobs sharing a node don't collide
    assert read_launch_env({**env, "MASTER_PORT": "999"}).master_port == 999


def test_single_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert launch.master_port > 0


@pytest.mark.parametrize(
    "requested, cuda, gpus, backend",
    [
        ("auto", False, False, "gloo"),
        ("auto", True, True, "nccl"),
        ("nccl", True, True, "nccl"),
        ("gloo", False, False, "gloo"),
        ("gloo", False, True, "gloo"),
    ],
)
def test_choose_backend(requested, cuda, gpus, backend):
    assert choose_backend(requested, cuda, gpus) == backend


@pytest.mark.parametrize(
    "requested, cuda, gpus, message",
    [
        ("auto", False, True, "GPUs were found but CUDA is unusable"),
        ("nccl", False, False, "parallel.backend=nccl needs CUDA"),
        ("nccl", False, True, "parallel.backend=nccl needs CUDA"),
        ("gloo", True, True, "CUDA is available here"),
    ],
)
def test_choose_backend_refuses(requested, cuda, gpus, message):
    with pytest.raises(ConfigError, match=message):
        choose_backend(requested, cuda, gpus)


def test_auto_refusal_says_how_to_force_cpu():
    with pytest.raises(ConfigError, match="parallel.backend=gloo to force CPU mode"):
        choose_backend("auto", False, True)


@pytest.mark.parametrize(
    "visible, present",
    [("0,1", True), ("GPU-8f2e", True), ("MIG-1a2b", True), ("", False), ("-1", False)],
)
def test_cuda_visible_devices_counts_as_gpus(monkeypatch, visible, present):
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvidia_gpus_present() is present


def test_nvidia_device_files_count_as_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(
        distributed.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "/dev/" in pattern else []
    )
    assert nvidia_gpus_present()


@pytest.mark.parametrize(
    "backend, cuda, gpus",
    [("auto", False, True), ("nccl", False, False), ("gloo", True, False)],
)
def test_init_distributed_refuses_before_starting_anything(
    monkeypatch, tmp_path, backend, cuda, gpus
):
    model = write_hf_config(tmp_path / "model", "qwen2")
    cfg = load_config(None, [f"model.hf_config={model}", f"parallel.backend={backend}"])
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distributed, "nvidia_gpus_present", lambda: gpus)
    launch = distributed.LaunchEnv(0, 1, 0, "127.0.0.1", 1, "single")
    with pytest.raises(ConfigError, match=f"parallel.backend={backend}"):
        distributed.init_distributed(cfg, read_hf_config(str(model)), launch)
    assert not distributed.dist.is_initialized() and not cpu_compat.enabled()


def test_this_machine_shows_no_gpu():
    """The CPU tests run with the default backend "auto": it must keep choosing gloo here."""
    if distributed.torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert not nvidia_gpus_present()
