"""Fused SFPO ops: the C++/CUDA extension when built, else a bit-identical pure-torch fallback.

``SFPO_OPS_BACKEND=torch`` forces the fallback (tests, debugging); unset or ``auto`` picks the
extension whenever it can handle the tensors' device: for a GPU, when its kernels were built for
an architecture that runs there (checked once per device, see ``cuda_arch``). Whenever the
fallback stands in for the extension, one warning says why.
"""

import logging
import os
from collections.abc import Sequence

import torch

from sfpo_megatron.ops import _fallback, cuda_arch
from sfpo_megatron.ops.host_stream import reposition_from_host_
from sfpo_megatron.ops.layout import chunk_segments, snapshot_views

try:
    from sfpo_megatron import _C
except ImportError as _exc:
    _C = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = ""

__all__ = [
    "backend",
    "chunk_segments",
    "extension_available",
    "reposition_",
    "reposition_from_host_",
    "snapshot_",
    "snapshot_views",
]

logger = logging.getLogger("sfpo_megatron.ops")

_INSTALL = "pip install --no-build-isolation -e ."
_warned = False
_cuda_problems: dict[int, str | None] = {}  # per GPU index: why _C cannot run there, or None


def _forced_torch() -> bool:
    """Read SFPO_OPS_BACKEND on every call so tests and users can flip it at runtime."""
    value = os.environ.get("SFPO_OPS_BACKEND", "auto").strip().lower()
    if value not in ("auto", "", "torch"):
        raise ValueError(f"SFPO_OPS_BACKEND must be 'auto' or 'torch', got {value!r}")
    return value == "torch"


def extension_available() -> bool:
    """Whether sfpo_megatron._C imported (regardless of SFPO_OPS_BACKEND)."""
    return _C is not None


def backend(device: torch.device | str | None = None) -> str:
    """The backend the ops use: "extension-cuda", "extension-cpu" or "torch".

    With a device, the one they use for tensors there ("torch" on a GPU the kernels cannot run on).
    """
    if _forced_torch() or _C is None:  # validates SFPO_OPS_BACKEND either way
        return "torch"
    if device is not None and torch.device(device).type == "cuda":
        return "extension-cuda" if _cuda_problem(torch.device(device)) is None else "torch"
    return "extension-cuda" if _C.has_cuda() else "extension-cpu"


def _cuda_problem(device: torch.device) -> str | None:
    """Why _C cannot run on this GPU (None if it can); the architecture is checked once per GPU."""
    if not _C.has_cuda():
        return "sfpo_megatron._C was built without CUDA kernels"
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _cuda_problems:
        capability = torch.cuda.get_device_capability(index)
        _cuda_problems[index] = cuda_arch.unsupported_reason(_C.cuda_archs(), capability)
    return _cuda_problems[index]


def _warn_fallback_once(reason: str, remedy: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "sfpo_megatron ops: %s; using the slower pure-torch fallback (same results). To use "
            "the fused kernels, %s.",
            reason,
            remedy,
        )


def _use_extension(device: torch.device | None) -> bool:
    """Whether _C can take tensors on device; warns once when the fallback has to stand in."""
    if _forced_torch():
        return False
    if _C is None:
        _warn_fallback_once(
            f"the C++ extension sfpo_megatron._C is not built ({_IMPORT_ERROR})",
            f"build it with `{_INSTALL}` (SFPO_BUILD_CUDA=1 to require the CUDA kernels)",
        )
        return False
    if device is not None and device.type == "cuda":
        problem = _cuda_problem(device)
        if problem is not None:
            _warn_fallback_once(
                problem,
                f"rebuild it with `SFPO_BUILD_CUDA=1 {_INSTALL}` on a machine with this GPU (or "
                "with its compute capability in TORCH_CUDA_ARCH_LIST)",
            )
            return False
    return True


def reposition_(
    main: Sequence[torch.Tensor],
    snap: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor] | None,
    alpha: float,
) -> None:
    """In place: main = snap + alpha * (main - snap) (fp32); model = main rounded to its dtype.

    main and snap are fp32 contiguous tensors paired by index with equal element counts; model,
    if given, holds the matching fp32/bf16/fp16 parameters to refresh in the same pass.
    """
    main, snap = list(main), list(snap)
    model = None if model is None else list(model)
    if _use_extension(main[0].device if main else None):
        _C.reposition_(main, snap, model, float(alpha))
    else:
        _fallback.reposition_(main, snap, model, alpha)


def snapshot_(srcs: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the fp32 contiguous srcs into flat back to back (the ``snapshot_views`` layout).

    flat is 1-D fp32 contiguous with at least the srcs' total element count, on the srcs' device
    or, for CUDA srcs, on the CPU. On CUDA the copies are queued on the current stream and the call
    returns at once: record an event to know when flat is complete, and keep srcs unchanged and
    alive until then. A CPU flat should be pinned; a pageable one is still filled correctly, but
    each copy then blocks the host until it is done. On the CPU the call returns when flat is full.
    """
    srcs = list(srcs)
    if _use_extension(srcs[0].device if srcs else None):
        _C.snapshot_(srcs, flat)
    else:
        _fallback.snapshot_(srcs, flat)
