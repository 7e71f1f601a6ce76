"""Weight sync to rollout servers over a broadcast group (disaggregated rollout): SGLang's
``/update_weights_from_distributed`` with flattened buckets, one group per pipeline stage so
stages send without waiting on each other.

Per update (:func:`update_session`, shared with the colocated sync): pause, flush once, begin;
per bucket one flattened broadcast and one request (the version rides on each stage's last
bucket only); end, continue; the version is read back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.hf.export import SYNC_BUCKET_MB, export_stream, stage_leader
from sfpo_megatron.launch.parallel import on_lead
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.protocol.flat_bucket import flatten
from sfpo_megatron.protocol.group import weight_update_group
from sfpo_megatron.rollout.sglang_client import SGLangClient

T = TypeVar("T")


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with whether it is the last one (one item of look-ahead, nothing stored)."""
    iterator = iter(items)
    previous = next(iterator, None)
    for item in iterator:
        yield previous, False
        previous = item
    if previous is not None:
        yield previous, True


@contextmanager
def update_session(clients: list[SGLangClient], version: int) -> Iterator[None]:
    """Collective over all ranks around one weight update: global rank 0 pauses generation,
    flushes the cache once and opens the update session on every server; the body sends the
    buckets; then rank 0 closes the session, resumes generation and checks that each server
    reports ``version``."""

    def begin() -> None:
        for client in clients:
            client.pause_generation()
            client.flush_cache()
            client.begin_weight_update()

    def end() -> None:
        for client in clients:
            client.end_weight_update()
            client.continue_generation()
            served = client.weight_version()
            if served != str(version):
                raise RolloutError(f"{client.url} serves weight version {served}, pushed {version}")

    on_lead(begin)
    yield
    dist.barrier()
    on_lead(end)


class DistributedSync:
    """Trainer side. Every rank calls :meth:`connect` and :meth:`push` (collectives); each
    pipeline stage's TP-0 / DP-0 rank is rank 0 of its own group with each server."""

    def __init__(
        self,
        clients: list[SGLangClient],
        master_address: str,
        base_port: int,
        backend: str = "gloo",
        engine_ranks: int = 1,
        bucket_mb: float = SYNC_BUCKET_MB,
        *,
        timeout_s: float,
        weight_format: str = "bf16",
    ) -> None:
        self.clients, self.master_address, self.base_port = clients, master_address, base_port
        self.backend, self.engine_ranks = backend, engine_ranks
        self.bucket_mb, self.timeout_s = bucket_mb, timeout_s
        self.weight_format = weight_format
        self.groups: list = []
        self.buckets_sent = 0
        self.pool = ThreadPoolExecutor(max(1, len(clients)))

    @property
    def sender(self) -> bool:
        return stage_leader()

    def _group_name(self, server: int) -> str:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        return f"sfpo-{self.base_port}-stage{stage}-server{server}"

    def connect(self) -> None:
        """Each stage's sender hosts one group per server; the server's join request blocks
        until the group exists, so it is fired from a thread first."""
        if self.sender:
            stage = parallel_state.get_pipeline_model_parallel_rank()
            for index, client in enumerate(self.clients):
                port = self.base_port + stage * len(self.clients) + index
                joined = self.pool.submit(
                    client.init_weights_update_group,
                    self.master_address,
                    port,
                    1,
                    self.engine_ranks + 1,
                    self._group_name(index),
                    self.backend,
                )
                self.groups.append(
                    weight_update_group(
                        self.master_address,
                        port,
                        self.engine_ranks + 1,
                        0,
                        self._group_name(index),
                        self.backend,
                        self.timeout_s,
                    )
                )
                joined.result()
        dist.barrier()

    def push(self, chunks: list, arch: ModelArch, version: int) -> None:
        """Send this model to every server as ``version``; raises if a server disagrees."""
        with update_session(self.clients, version):
            for bucket, last in with_last(
                export_stream(chunks, arch, self.bucket_mb, self.weight_format)
            ):
                if self.sender:
                    self._send(bucket, str(version) if last else None)

    def _send(self, bucket, weight_version: str | None) -> None:
        """One request and one broadcast per server for one bucket."""
        flat = flatten(bucket)
        # The export stream hands over host tensors; NCCL broadcasts device memory only.
        buffer = flat.buffer.cuda() if self.backend == "nccl" else flat.buffer
        for index, (client, group) in enumerate(zip(self.clients, self.groups, strict=True)):
            reply = self.pool.submit(
                client.update_weights_from_distributed,
                flat.names,
                flat.dtypes,
                flat.shapes,
                self._group_name(index),
                weight_version,
            )
            dist.broadcast(buffer, src=0, group=group)
            reply.result()
        self.buckets_sent += 1
