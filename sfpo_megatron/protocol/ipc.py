"""The colocated weight-update payload, both ends of it: one engine rank's entry of SGLang's
``/update_weights_from_tensor`` as a handle to the sender's memory (CUDA tensors pickle to
CUDA-IPC handles, CPU tensors to shared-memory file names), and its decoding on the server
(docs/sglang_protocol.md, "Colocated update")."""

from __future__ import annotations

import base64
import inspect
import io
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import torch
import torch.multiprocessing
from torch.multiprocessing import reductions

from sfpo_megatron.protocol.flat_bucket import FlatBucket, layout, unflatten

_DEVICE_ARG = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters).index(
    "storage_device"
)
"""Where a CUDA tensor's reduction carries its device (torch's ``rebuild_cuda_tensor``)."""


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
