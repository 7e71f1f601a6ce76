"""Weight sync into the embedded engines living in the trainer's own processes (one per
``rollout.server_tp`` ranks, or one on global rank 0).

Every rank walks the export stream of its pipeline stage (its TP gathers are collectives);
with PP > 1 each stage's buckets are broadcast over the pipeline group, one stage after the
other, so every rank sees every bucket and a rank with an engine streams them straight into
it. Then every engine's new version is checked on every rank: a refused bucket or a wrong
version fails the sync on all of them with :class:`RolloutError` (none is left waiting).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.common.samples import RolloutEngine
from sfpo_megatron.hf.export import SYNC_BUCKET_MB, Bucket, export_stream
from sfpo_megatron.models.arch import ModelArch


def every_stage_buckets(
    chunks: list, arch: ModelArch, bucket_mb: float, weight_format: str = "bf16"
) -> Iterator[Bucket]:
    """Collective: the whole model's buckets, stage after stage, on every rank."""
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    if stages == 1:
        yield from export_stream(chunks, arch, bucket_mb, weight_format)
        return
    own = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    for stage in range(stages):
        stream = export_stream(chunks, arch, bucket_mb, weight_format) if stage == own else None
        while True:
            item = [None if stream is None else next(stream, None)]
            dist.broadcast_object_list(item, group=group, group_src=stage)
            if item[0] is None:
                break
            yield item[0]


def sync_in_process(
    chunks: list,
    arch: ModelArch,
    engine: RolloutEngine | None,
    version: int,
    bucket_mb: float = SYNC_BUCKET_MB,
    weight_format: str = "bf16",
) -> None:
    """Collective over all ranks; ``engine`` is this rank's engine (None on ranks without
    one). Raises :class:`RolloutError` on every rank if any engine failed to take ``version``."""
    stream = every_stage_buckets(chunks, arch, bucket_mb, weight_format)
    error = None
    if engine is not None:
        try:
            engine.update_weights(stream, version)
            if engine.weight_version() != version:
                error = f"it serves version {engine.weight_version()}"
        except (ValueError, RuntimeError) as failure:
            error = str(failure)
    for _ in stream:  # the rest of the collectives, after a failure or without an engine
        pass
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [f"engine on rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise RolloutError(f"weight sync (version {version}) failed: {'; '.join(failed)}")
