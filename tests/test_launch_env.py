"""Rank layout from torchrun's and Slurm's environments."""

from __future__ import annotations

import pytest

from sfpo_megatron.distributed import first_slurm_host, read_launch_env


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
