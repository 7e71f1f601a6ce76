"""Pure-torch reposition and snapshot, bit-identical to the C++/CUDA kernels: either may be used."""

from collections.abc import Sequence

import torch

from sfpo_megatron.ops.layout import check_flat, snapshot_views

_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(
    main: Sequence[torch.Tensor],
    snap: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor] | None,
) -> None:
    """Validate like csrc/binding.cpp (same order and wording) so both backends fail alike."""
    if len(main) != len(snap):
        raise ValueError(
            f"reposition_: main and snap must have the same length, got {len(main)} and {len(snap)}"
        )
    if model is not None and len(model) != len(main):
        raise ValueError(
            f"reposition_: model must have the same length as main, got {len(model)} and "
            f"{len(main)}"
        )
    for i, (m, s) in enumerate(zip(main, snap, strict=True)):
        if m.dtype != torch.float32:
            raise TypeError(f"reposition_: main[{i}] must be float32, got {m.dtype}")
        if s.dtype != torch.float32:
            raise TypeError(f"reposition_: snap[{i}] must be float32, got {s.dtype}")
        if model is not None and model[i].dtype not in _MODEL_DTYPES:
            raise TypeError(
                f"reposition_: model[{i}] must be float32, bfloat16 or float16, "
                f"got {model[i].dtype}"
            )
        others = [("main", m), ("snap", s)] + ([("model", model[i])] if model is not None else [])
        for name, t in others:
            if t.device != main[0].device:
                raise ValueError(
                    f"reposition_: {name}[{i}] is on {t.device} but main[0] is on {main[0].device}"
                )
        for name, t in others[1:]:
            if t.numel() != m.numel():
                raise ValueError(
                    f"reposition_: {name}[{i}] has {t.numel()} elements but main[{i}] has "
                    f"{m.numel()}"
                )
        for name, t in others:
            if not t.is_contiguous():
                raise ValueError(f"reposition_: {name}[{i}] must be contiguous")


@torch.no_grad()
def reposition_(
    main: Sequence[torch.Tensor],
    snap: Sequence[torch.Tensor],
    model: Sequence[torch.Tensor] | None,
    alpha: float,
) -> None:
    """main = snap + alpha * (main - snap) in fp32, in place; model = main cast to its dtype.

    sub_/mul_/add_ round separately in fp32 (alpha rounded to fp32), exactly like the kernels.
    Flat views let tensors of equal size but different shape be paired, as in the extension.
    """
    check_inputs(main, snap, model)
    for i, (m, s) in enumerate(zip(main, snap, strict=True)):
        flat_main, flat_snap = m.view(-1), s.view(-1)
        flat_main.sub_(flat_snap).mul_(alpha).add_(flat_snap)
        if model is not None:
            model[i].view(-1).copy_(flat_main)


def check_snapshot_inputs(srcs: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Validate like csrc/binding.cpp (same order and wording) so both backends fail alike."""
    for i, s in enumerate(srcs):
        if s.dtype != torch.float32:
            raise TypeError(f"snapshot_: srcs[{i}] must be float32, got {s.dtype}")
        if s.device != srcs[0].device:
            raise ValueError(
                f"snapshot_: srcs[{i}] is on {s.device} but srcs[0] is on {srcs[0].device}"
            )
        if not s.is_contiguous():
            raise ValueError(f"snapshot_: srcs[{i}] must be contiguous")
    host_copy = bool(srcs) and srcs[0].is_cuda and flat.device.type == "cpu"
    if srcs and flat.device != srcs[0].device and not host_copy:
        raise ValueError(
            f"snapshot_: flat is on {flat.device} but srcs[0] is on {srcs[0].device}; flat must be "
            "on the same device, or on the CPU for CUDA srcs"
        )
    check_flat(flat, sum(s.numel() for s in srcs), "snapshot_: flat")


@torch.no_grad()
def snapshot_(srcs: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy srcs into consecutive views of flat; device->host copies are non-blocking."""
    check_snapshot_inputs(srcs, flat)
    if not srcs:
        return
    views = snapshot_views(flat, srcs)
    flat_srcs = [s.view(-1) for s in srcs]
    if flat.device == srcs[0].device:
        torch._foreach_copy_(views, flat_srcs)
        return
    # _foreach_copy_ wants one device; per-tensor copies keep device->pinned-host copies async.
    for view, src in zip(views, flat_srcs, strict=True):
        view.copy_(src, non_blocking=True)
