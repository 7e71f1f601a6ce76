"""Opt-in patches that let Megatron-Core 0.16 run on CPU with gloo (tests and CI only).

Megatron-Core hard-codes CUDA in a handful of places (device="cuda" factories, the CUDA
RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks). Each patch below maps
one of those to the CPU and says why. :func:`enable` refuses to run when CUDA is
available, so none of this can be active on a GPU; nothing here is applied on import, and
:func:`disable` gives back every original (``launch.parallel.shutdown`` calls it).
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_log = logging.getLogger(__name__)
_MISSING = object()
_originals: list[tuple[object, str, object]] = []
"""(owner, attribute, what the owner itself held before, or _MISSING) per patch, in order."""
_mode: TorchFunctionMode | None = None


def _to_cpu(device: object) -> object:
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):
        return "cpu"
    return device


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and integer devices) in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return func(*args, **kwargs)


def _cuda_type_string(original):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            # The function mode may re-dispatch here, so the name can already be converted.
            if self.device.type != "cpu" or name.startswith("torch.cuda."):
                return name
            return name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _patch(owner: object, name: str, replacement: object) -> None:
    _originals.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, replacement)


def enable() -> None:
    """Apply every patch once. Raises if CUDA is available (the patches would corrupt a GPU run)."""
    global _mode
    if _mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("launch.cpu_compat must not be enabled when CUDA is available")
    from megatron.core.tensor_parallel import random as mp_random

    # Megatron allocates with device=torch.cuda.current_device(): make that the CPU.
    _patch(torch.cuda, "current_device", lambda: "cpu")
    # p2p communication and DDP call cuda.synchronize around collectives: nothing to wait for.
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    # The distributed optimizer moves send buffers with .cuda().
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    # The (distributed) optimizer and clip_grads classify params by their CUDA type string.
    _patch(torch.Tensor, "type", _cuda_type_string(torch.Tensor.type))
    # The RNG tracker (attention dropout fork, activation recompute) saves CUDA RNG states:
    # keep them in the CPU generator instead.
    _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    _patch(torch.cuda, "manual_seed", torch.manual_seed)
    _patch(mp_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(
        mp_random, "_set_cuda_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state)
    )
    # Schedules, optimizers and clip_grads create scalars with device="cuda".
    _mode = _CudaFactoriesOnCpu()
    _mode.__enter__()
    _log.info("Megatron-Core CPU compatibility patches enabled (parallel.backend: gloo)")


def disable() -> None:
    """Undo :func:`enable`: leave the function mode and restore every patched attribute.
    A no-op when not enabled."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _originals:
        owner, name, original = _originals.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _log.debug("Megatron-Core CPU compatibility patches disabled")


def enabled() -> bool:
    return _mode is not None
