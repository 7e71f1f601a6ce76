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

import base64
import inspect
import io
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing
from megatron.core import parallel_state
from torch.multiprocessing import reductions

from sfpo_megatron.checkpoint_io.hf_export import export_stream
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.rollout.sglang_client import (
    MEMORY_TAGS,
    WEIGHTS_TAG,
    RolloutError,
    SGLangClient,
)
from sfpo_megatron.sync.distributed import on_lead, update_session, with_last
from sfpo_megatron.sync.flat_bucket import FlatBucket, flatten, layout, total_bytes, unflatten

_DEVICE_ARG = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters).index(
    "storage_device"
)
"""Where a CUDA tensor's reduction carries its device (torch's ``rebuild_cuda_tensor``)."""


# ---------------------------------------------------------------------- the payload


def encode_bucket(flat: FlatBucket) -> str:
    """One engine rank's entry: base64 of a ForkingPickler dump of SGLang's flattened-bucket
    dict (``flattened_tensor`` + ``metadata`` records, ``srt/weight_sync/tensor_bucket.py``).
    The tensor goes as a handle, so ``flat.buffer`` must outlive the server's reply."""
    metadata = [
        SimpleNamespace(
            name=name,
            shape=torch.Size(shape),
            dtype=dtype,
            start_idx=start,
            end_idx=stop,
            numel=stop - start,
        )
        for name, shape, (dtype, start, stop) in zip(
            flat.names, flat.shapes, layout(flat.dtypes, flat.shapes), strict=True
        )
    ]
    out = io.BytesIO()
    pickler = ForkingPickler(out)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor
    with _file_system_sharing():
        pickler.dump({"flattened_tensor": flat.buffer, "metadata": metadata})
    return base64.b64encode(out.getvalue()).decode()


def decode_bucket(entry: str) -> list[tuple[str, torch.Tensor]]:
    """The receiving side (the embedded engine's server): the named tensors of one entry, as
    views of the sender's memory. Raises ValueError on anything but a well-formed bucket."""
    try:
        payload = _Unpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()
    except Exception as error:  # a trust boundary: whatever the bytes do, it is a bad request
        raise ValueError(f"cannot unpickle the entry: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or set(payload) != {"flattened_tensor", "metadata"}:
        raise ValueError("an entry must be a dict of 'flattened_tensor' and 'metadata'")
    buffer, metadata = payload["flattened_tensor"], payload["metadata"]
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("'flattened_tensor' must be a 1-D uint8 tensor")
    try:
        names = [m.name for m in metadata]
        dtypes = [str(m.dtype).removeprefix("torch.") for m in metadata]
        shapes = [list(m.shape) for m in metadata]
        ranges = [(m.start_idx, m.end_idx, m.numel) for m in metadata]
    except (AttributeError, TypeError) as error:
        raise ValueError(f"malformed metadata: {error}") from None
    if ranges != [(start, stop, stop - start) for _, start, stop in layout(dtypes, shapes)]:
        raise ValueError("metadata offsets are not the packed flattened_bucket layout")
    return unflatten(buffer, names, dtypes, shapes)


@contextmanager
def _file_system_sharing() -> Iterator[None]:
    """CPU storages go by shared-memory file name while pickling. torch's default passes file
    descriptors through a socket that only processes sharing this one's authkey (its
    children) may connect to, so an unrelated server could never open them."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def _reduce_tensor(tensor: torch.Tensor) -> tuple:
    """torch's reduction, naming a CUDA tensor's device by UUID instead of index, as SGLang's
    patched reductions do (``srt/utils/patch_torch.py``): the engine may number GPUs
    differently (another CUDA_VISIBLE_DEVICES), and it accepts either."""
    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor and isinstance(args[_DEVICE_ARG], int):
        uuid = str(torch.cuda.get_device_properties(args[_DEVICE_ARG]).uuid)
        args = (*args[:_DEVICE_ARG], uuid, *args[_DEVICE_ARG + 1 :])
    return rebuild, args


def _rebuild_cuda_tensor(*args: object) -> torch.Tensor:
    device = args[_DEVICE_ARG]
    if isinstance(device, str):
        found = [
            i
            for i in range(torch.cuda.device_count())
            if str(torch.cuda.get_device_properties(i).uuid) == device
        ]
        if not found:
            raise pickle.UnpicklingError(f"no visible CUDA device has UUID {device}")
        device = found[0]
    return reductions.rebuild_cuda_tensor(*args[:_DEVICE_ARG], device, *args[_DEVICE_ARG + 1 :])


class _Unpickler(pickle.Unpickler):
    """Only the globals a bucket of tensors needs (SGLang unpickles through an allow-list
    too, ``SafeUnpickler``): a payload cannot run code in the server."""

    ALLOWED = {
        ("torch.multiprocessing.reductions", "rebuild_tensor"),
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        ("types", "SimpleNamespace"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_cuda_tensor
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_fd"):
            raise pickle.UnpicklingError(
                "CPU tensors shared by file descriptor cannot reach another process tree: "
                "pickle them under the 'file_system' sharing strategy"
            )
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weight payload")


# ---------------------------------------------------------------------- the trainer side


class ColocatedSync:
    """Trainer side; every rank constructs it and calls :meth:`release` / :meth:`push`
    (collectives). ``clients[e]`` is engine ``e``; ``len(clients) * engine_tp`` must equal the
    world size (one engine rank per trainer device, engines on consecutive ranks)."""

    def __init__(
        self,
        clients: list[SGLangClient],
        engine_tp: int = 1,
        bucket_mb: float = 512,
        device: torch.device | None = None,
    ) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if engine_tp < 1 or len(clients) * engine_tp != world:
            raise ValueError(
                f"colocated sync: {len(clients)} engine(s) x engine TP {engine_tp} must cover "
                f"the {world} trainer ranks (engine e's TP rank j on global rank "
                f"e * engine_tp + j)"
            )
        self.clients, self.engine_tp, self.bucket_mb = clients, engine_tp, bucket_mb
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
                stream = with_last(export_stream(chunks, arch, self.bucket_mb)) if own else None
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
