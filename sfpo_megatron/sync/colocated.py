"""Colocated weight sync: the trainer and the rollout engines share devices, so a bucket
travels to SGLang's ``/update_weights_from_tensor`` as a handle to the trainer's memory, not
as bytes. CUDA tensors pickle to CUDA-IPC handles, CPU tensors to shared-memory file names:
one code path for both (docs/sglang_protocol.md, "Colocated update").

Layout: engine ``e`` (``clients[e]``) has ``engine_tp`` TP ranks and its rank ``j`` shares the
device of global trainer rank ``e * engine_tp + j``, which supplies entry ``j`` of each request
(every engine rank reads only its own entry, from its own device). So every trainer rank needs
every bucket: TP and DP replicas walk the export stream anyway, and with PP > 1 each stage's
buckets are broadcast over the pipeline group, one stage after the other.

Per bucket: flatten, move to this rank's device, serialize, gather the entries on the engine's
first rank, one POST per engine (the version on the model's last bucket only); then all ranks
agree on the replies, and only then is the buffer dropped (``torch.cuda.ipc_collect()`` on GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing
from megatron.core import parallel_state

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.hf.export import SYNC_BUCKET_MB, export_stream
from sfpo_megatron.launch.parallel import on_lead
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.protocol.flat_bucket import FlatBucket, flatten, total_bytes
from sfpo_megatron.protocol.ipc import encode_bucket
from sfpo_megatron.rollout.sglang_client import MEMORY_TAGS, WEIGHTS_TAG, SGLangClient
from sfpo_megatron.sync.broadcast import update_session, with_last


class ColocatedSync:
    """Trainer side; every rank constructs it and calls :meth:`release` / :meth:`push`
    (collectives). ``clients[e]`` is engine ``e``; ``len(clients) * engine_tp`` must equal the
    world size (one engine rank per trainer device, engines on consecutive ranks)."""

    def __init__(
        self,
        clients: list[SGLangClient],
        engine_tp: int = 1,
        bucket_mb: float = SYNC_BUCKET_MB,
        device: torch.device | None = None,
        weight_format: str = "bf16",
    ) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if engine_tp < 1 or len(clients) * engine_tp != world:
            raise ValueError(
                f"colocated sync: {len(clients)} engine(s) x engine TP {engine_tp} must cover "
                f"the {world} trainer ranks (engine e's TP rank j on global rank "
                f"e * engine_tp + j)"
            )
        self.clients, self.engine_tp, self.bucket_mb = clients, engine_tp, bucket_mb
        self.weight_format = weight_format
        self.engine, self.leader = rank // engine_tp, rank % engine_tp == 0
        cuda = torch.cuda.is_available()
        self.device = device or torch.device(
            f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        )
        self.group = None  # this engine's ranks, gathering its entries (gloo: they are strings)
        if engine_tp > 1:
            for engine in range(len(clients)):
                ranks = list(range(engine * engine_tp, (engine + 1) * engine_tp))
                group = dist.new_group(ranks, backend="gloo")
                if engine == self.engine:
                    self.group = group
        self.released = False
        self.buckets_sent = 0
        """Requests this rank posted (its engine's first rank only)."""

    def release(self) -> None:
        """Free every engine's memory (all tags) for training; the next :meth:`push` brings it
        back. SGLang needs ``--enable-memory-saver`` and an idle server."""
        self._on_engines(lambda client: client.release_memory_occupation(list(MEMORY_TAGS)))
        self.released = True

    def push(self, chunks: list, arch: ModelArch, version: int) -> None:
        """Send this model to every engine as ``version``; raises if an engine refuses a
        bucket or reports another version. After :meth:`release`, the weights come back
        first and the KV cache (and CUDA graphs) only once they are loaded."""
        if self.released:
            self._on_engines(lambda client: client.resume_memory_occupation([WEIGHTS_TAG]))
        stages = parallel_state.get_pipeline_model_parallel_world_size()
        stage_rank = parallel_state.get_pipeline_model_parallel_rank()
        with update_session(self.clients, version):
            for stage in range(stages):
                own = stage == stage_rank
                stream = (
                    with_last(export_stream(chunks, arch, self.bucket_mb, self.weight_format))
                    if own
                    else None
                )
                while (bucket := self._next_bucket(stream, stage, stages)) is not None:
                    self._post(*bucket, version)
                    del bucket  # every server has its copy: hand the memory back
                    if torch.cuda.is_available():
                        torch.cuda.ipc_collect()
        if self.released:
            rest = [tag for tag in MEMORY_TAGS if tag != WEIGHTS_TAG]
            self._on_engines(lambda client: client.resume_memory_occupation(rest))
            self.released = False

    def _on_engines(self, call: Callable[[SGLangClient], object]) -> None:
        """Global rank 0 makes ``call`` on every engine; a failure raises on every rank."""

        def on_every_engine() -> None:
            for client in self.clients:
                call(client)

        on_lead(on_every_engine)

    def _next_bucket(
        self, stream: Iterator | None, stage: int, stages: int
    ) -> tuple[FlatBucket, bool] | None:
        """Stage ``stage``'s next bucket on this rank's device with whether it is the model's
        last, or None at the stage's end; ``stream`` is the stage's own export (None on the
        other stages, which receive over the pipeline group)."""
        flat, last = None, False
        if stream is not None:
            item = next(stream, None)
            if item is not None:
                bucket, last = item
                flat = flatten(bucket)
                flat = replace(flat, buffer=flat.buffer.to(self.device))
        if stages > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            header = [None if flat is None else (flat.names, flat.dtypes, flat.shapes, last)]
            dist.broadcast_object_list(header, group=group, group_src=stage)
            if header[0] is None:
                return None
            names, dtypes, shapes, last = header[0]
            if flat is None:
                buffer = torch.empty(
                    total_bytes(dtypes, shapes), dtype=torch.uint8, device=self.device
                )
                flat = FlatBucket(buffer, names, dtypes, shapes)
            dist.broadcast(flat.buffer, group=group, group_src=stage)
        if flat is None:
            return None
        return flat, last and stage == stages - 1

    def _post(self, flat: FlatBucket, last: bool, version: int) -> None:
        """Gather the engine's entries on its first rank, which posts them (with ``version``
        if this is the model's ``last`` bucket); every rank waits for every engine's reply
        (the buffers must live until then) and raises if any engine refused."""
        entry = encode_bucket(flat)
        entries = [entry]
        if self.group is not None:
            entries = [None] * self.engine_tp if self.leader else None
            dist.gather_object(entry, entries, group=self.group, group_dst=0)
        error = None
        if self.leader:
            try:
                self.clients[self.engine].update_weights_from_tensor(
                    entries, str(version) if last else None
                )
                self.buckets_sent += 1
            except RolloutError as refused:
                error = f"engine {self.engine}: {refused}"
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = [e for e in errors if e is not None]
        if failed:
            raise RolloutError(f"colocated weight update failed: {'; '.join(failed)}")
