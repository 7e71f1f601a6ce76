"""The process group a trainer rank and an inference engine share for weight broadcasts,
built the way SGLang 0.5.23 builds its side (``srt/utils/common.py:
init_custom_process_group``): a TCP store on master_address:master_port hosted by rank 0
(the trainer), wrapped in ``PrefixStore(group_name, ...)``, a new process group on it, and an
identity rank map so ``src=0`` means group rank 0. A plain ``init_process_group`` would hang
both ends (one default group per process; torchrun's agent store serves nobody)."""

from __future__ import annotations

import datetime

import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world


def weight_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str,
    timeout_s: float,
):
    """Join (rank > 0) or host (rank 0) the group; blocks until all ``world_size`` members did."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address,
        master_port,
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    store.set_timeout(timeout)
    prefixed = dist.PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), prefixed, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
