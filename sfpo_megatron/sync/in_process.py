"""Weight sync into an engine living in global rank 0's process (the embedded default).

Every rank walks the export stream (its TP gathers are collectives); rank 0 loads its own
pipeline stage's buckets and receives every other stage's from that stage's (TP 0, DP 0)
rank, then hands all of them to the engine in one update with the new version.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.common.samples import RolloutEngine
from sfpo_megatron.hf.export import SYNC_BUCKET_MB, Bucket, export_stream, stage_leader
from sfpo_megatron.models.arch import ModelArch


def _stage_senders() -> list[int]:
    """Global rank of each pipeline stage's leader (see ``stage_leader``), by stage."""
    led: list = [None] * dist.get_world_size()
    mine = parallel_state.get_pipeline_model_parallel_rank() if stage_leader() else None
    dist.all_gather_object(led, mine)
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    return [led.index(stage) for stage in range(stages)]


def sync_in_process(
    chunks: list,
    arch: ModelArch,
    engine: RolloutEngine | None,
    version: int,
    bucket_mb: float = SYNC_BUCKET_MB,
    weight_format: str = "bf16",
) -> None:
    """Collective over all ranks; ``engine`` is used on global rank 0 only (None elsewhere)."""
    rank = dist.get_rank()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    senders = _stage_senders()
    collected: list[Bucket] = []
    for bucket in export_stream(chunks, arch, bucket_mb, weight_format):
        if rank == 0:
            collected.append(bucket)
        elif stage > 0 and rank == senders[stage]:
            dist.send_object_list([bucket], dst=0)
    if rank == senders[stage] and stage > 0:
        dist.send_object_list([None], dst=0)
    if rank == 0:
        for sender in senders[1:]:
            while True:
                received: list = [None]
                dist.recv_object_list(received, src=sender)
                if received[0] is None:
                    break
                collected.append(received[0])
        if engine is None:
            raise ValueError("sync_in_process: global rank 0 needs the engine")
        engine.update_weights(collected, version)
    dist.barrier()
