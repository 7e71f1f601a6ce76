"""Reposition from a snapshot kept in host memory, streamed through two small device buffers.

Keeping SFPO's snapshot in pinned host memory saves 4 device bytes per parameter; the price is
reading it back over the host link once per reposition. Double buffering hides the compute: the
host-to-device copy of chunk c+1 (side stream) overlaps the reposition of chunk c (current stream),
so the op runs at about host-link bandwidth.
"""

from collections.abc import Sequence

import torch

# Looked up at call time (ops.reposition_): sfpo_megatron.ops imports this module.
from sfpo_megatron import ops
from sfpo_megatron.ops._fallback import check_inputs
from sfpo_megatron.ops.layout import check_flat, chunk_segments, snapshot_views


class _Staging:
    """Two staging buffers filled in turn: on a side stream for CUDA, inline on the CPU.

    On CUDA, the current (compute) stream waits for each fill, and each fill waits until the
    compute stream has released the buffer it overwrites (the reposition two chunks earlier).
    """

    def __init__(self, device: torch.device, chunk: int) -> None:
        self.buffers = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(2)]
        self.released: list[torch.cuda.Event | None] = [None, None]
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copier = torch.cuda.Stream(device)
            # The buffers were allocated in the compute stream's order: copy only after that.
            self.copier.wait_stream(self.compute)

    def fill(self, index: int, source: torch.Tensor) -> torch.Tensor:
        """Copy source into buffer index % 2; the filled part is ready for the current stream."""
        staged = self.buffers[index % 2][: source.numel()]
        if not self.cuda:
            staged.copy_(source)
            return staged
        with torch.cuda.stream(self.copier):
            released = self.released[index % 2]
            if released is not None:
                self.copier.wait_event(released)
            staged.copy_(source, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copier)
        self.compute.wait_event(ready)
        return staged

    def release(self, index: int) -> None:
        """Mark buffer index % 2 as consumed by the work queued so far on the compute stream."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.compute)
            self.released[index % 2] = event


@torch.no_grad()
def _reposition_chunked(
    main: list[torch.Tensor],
    host_flat: torch.Tensor,
    model: list[torch.Tensor] | None,
    alpha: float,
    chunk_elements: int,
) -> None:
    """Stream host_flat chunk by chunk and reposition the pieces of main/model each chunk covers."""
    numels = [t.numel() for t in main]
    total = sum(numels)
    if total == 0:
        return
    flat_main = [t.view(-1) for t in main]
    flat_model = None if model is None else [t.view(-1) for t in model]
    staging = _Staging(main[0].device, min(chunk_elements, total))
    for index, start in enumerate(range(0, total, chunk_elements)):
        stop = min(start + chunk_elements, total)
        staged = staging.fill(index, host_flat[start:stop])
        mains, snaps, models = [], [], []
        position = 0  # pieces are consecutive in flat, hence in the staging buffer
        for i, offset, length in chunk_segments(numels, start, stop):
            mains.append(flat_main[i][offset : offset + length])
            snaps.append(staged[position : position + length])
            if flat_model is not None:
                models.append(flat_model[i][offset : offset + length])
            position += length
        ops.reposition_(mains, snaps, None if flat_model is None else models, alpha)
        staging.release(index)


def reposition_from_host_(
    main: Sequence[torch.Tensor],
    host_flat: torch.Tensor,
    model: Sequence[torch.Tensor] | None,
    alpha: float,
    chunk_elements: int = 1 << 23,
    *,
    force_chunked: bool = False,
) -> None:
    """``reposition_`` reading the snapshot from the CPU, in the ``snapshot_views`` layout.

    CPU main: exactly ``reposition_`` on those views. CUDA main: host_flat (pin it, or the copies
    cannot overlap the compute) is streamed in chunks of ``chunk_elements`` through two staging
    buffers, the only device memory this uses (2 x chunk_elements x 4 bytes, freed on return);
    the work is queued on the current stream. Results are bit-identical to ``reposition_`` with the
    whole snapshot on the device. ``force_chunked`` runs the streamed path on the CPU (for tests).
    """
    main = list(main)
    model = None if model is None else list(model)
    if chunk_elements < 1:
        raise ValueError(
            f"reposition_from_host_: chunk_elements must be >= 1, got {chunk_elements}"
        )
    if host_flat.device.type != "cpu":
        raise ValueError(
            f"reposition_from_host_: host_flat must be on the CPU, got {host_flat.device}"
        )
    check_flat(host_flat, sum(t.numel() for t in main), "reposition_from_host_: host_flat")
    if main and main[0].device.type == "cpu" and not force_chunked:
        ops.reposition_(main, snapshot_views(host_flat, main), model, alpha)
        return
    # main doubles as the snapshot here so that main and model are validated before chunk 0 is
    # written; the staging pieces always match main, so no other check can fail midway.
    check_inputs(main, main, model)
    _reposition_chunked(main, host_flat, model, alpha, chunk_elements)
