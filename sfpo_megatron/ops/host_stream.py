"""Reposition from a snapshot kept in host memory, streamed through two small device buffers.

Keeping SFPO's snapshot in pinned host memory saves 4 device bytes per parameter; the price is
reading it back over the host link once per reposition. Double buffering hides the compute: the
host-to-device copy of chunk c+1 (side stream) overlaps the reposition of chunk c (current stream),
so the op runs at about host-link bandwidth.

The chunking and the ordering (which buffer a chunk goes to, what each copy and each reposition
waits for) are written once, in :func:`reposition_chunked_`, against a copy engine: on CUDA
:class:`StreamCopyEngine` (side stream and events), on the CPU :class:`SyncCopyEngine` (plain
copies, nothing to wait for), so that CPU tests run the very code the GPU runs.

``DEFAULT_CHUNK_ELEMENTS`` (2^23 elements: two 32 MiB fp32 staging buffers) is the chunk size
when the caller names none; it is not a config key.
"""

from collections.abc import Sequence
from typing import Protocol

import torch

# Looked up at call time (ops.reposition_): sfpo_megatron.ops imports this module.
from sfpo_megatron import ops
from sfpo_megatron.ops._fallback import check_inputs
from sfpo_megatron.ops.layout import check_flat, chunk_segments, snapshot_views

DEFAULT_CHUNK_ELEMENTS = 1 << 23
"""Elements per streamed chunk when the caller names none (module docstring); not a key."""
STAGING_BUFFERS = 2
"""Device buffers the chunks rotate through: one being filled while the other is read."""


class CopyEngine(Protocol):
    """Copies beside the compute (the current stream), ordered by opaque tokens."""

    def mark(self) -> object:
        """A token that is reached when the compute work queued so far is done."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> object:
        """Queue dst.copy_(src), to start once ``after`` (a mark) is reached; token of its end."""

    def wait(self, token: object) -> None:
        """Make the compute work queued from now on wait for ``token``."""


class SyncCopyEngine:
    """CPU: each copy is done when ``copy`` returns, so there is never anything to wait for."""

    def mark(self) -> None:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> None:
        dst.copy_(src)

    def wait(self, token: object) -> None:
        pass


class StreamCopyEngine:
    """CUDA: copies on a side stream; CUDA events order them against the current stream."""

    def __init__(self, device: torch.device) -> None:
        self.compute = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def _record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def mark(self) -> torch.cuda.Event:
        return self._record(self.compute)

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event
    ) -> torch.cuda.Event:
        self.side.wait_event(after)
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
        return self._record(self.side)

    def wait(self, token: torch.cuda.Event) -> None:
        self.compute.wait_event(token)


@torch.no_grad()
def reposition_chunked_(
    main: list[torch.Tensor],
    host_flat: torch.Tensor,
    model: list[torch.Tensor] | None,
    alpha: float,
    chunk_elements: int,
    engine: CopyEngine,
) -> None:
    """Stream host_flat chunk by chunk and reposition the pieces of main/model each chunk covers.

    Chunk c goes to staging buffer c % 2. Its copy starts once the compute has finished with that
    buffer (the reposition of chunk c - 2, or the buffer's allocation), and its reposition waits
    for the copy; meanwhile the copy of chunk c + 1 runs into the other buffer.
    """
    numels = [t.numel() for t in main]
    total = sum(numels)
    if total == 0:
        return
    flat_main = [t.view(-1) for t in main]
    flat_model = None if model is None else [t.view(-1) for t in model]
    size = min(chunk_elements, total)
    buffers = [
        torch.empty(size, dtype=torch.float32, device=main[0].device)
        for _ in range(STAGING_BUFFERS)
    ]
    free = [engine.mark()] * STAGING_BUFFERS  # when the compute is done with each buffer
    for index, start in enumerate(range(0, total, chunk_elements)):
        stop = min(start + chunk_elements, total)
        slot = index % STAGING_BUFFERS
        staged = buffers[slot][: stop - start]
        engine.wait(engine.copy(staged, host_flat[start:stop], after=free[slot]))
        mains, snaps, models = [], [], []
        position = 0  # pieces are consecutive in flat, hence in the staging buffer
        for i, offset, length in chunk_segments(numels, start, stop):
            mains.append(flat_main[i][offset : offset + length])
            snaps.append(staged[position : position + length])
            if flat_model is not None:
                models.append(flat_model[i][offset : offset + length])
            position += length
        ops.reposition_(mains, snaps, None if flat_model is None else models, alpha)
        free[slot] = engine.mark()


def reposition_from_host_(
    main: Sequence[torch.Tensor],
    host_flat: torch.Tensor,
    model: Sequence[torch.Tensor] | None,
    alpha: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    force_chunked: bool = False,
) -> None:
    """``reposition_`` reading the snapshot from the CPU, in the ``snapshot_views`` layout.

    CPU main: exactly ``reposition_`` on those views. CUDA main: host_flat (pin it, or the copies
    cannot overlap the compute) is streamed in chunks of ``chunk_elements`` through two staging
    buffers, the only device memory this uses (2 x chunk_elements x 4 bytes, freed on return);
    the work is queued on the current stream. Results are bit-identical to ``reposition_`` with the
    whole snapshot on the device. ``force_chunked`` streams on the CPU too, through
    :class:`SyncCopyEngine`: that is how the tests run the chunked path without a GPU.
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
    device = main[0].device if main else torch.device("cpu")
    if device.type == "cpu" and not force_chunked:
        ops.reposition_(main, snapshot_views(host_flat, main), model, alpha)
        return
    # main doubles as the snapshot here so that main and model are validated before chunk 0 is
    # written; the staging pieces always match main, so no other check can fail midway.
    check_inputs(main, main, model)
    engine = StreamCopyEngine(device) if device.type == "cuda" else SyncCopyEngine()
    reposition_chunked_(main, host_flat, model, alpha, chunk_elements, engine)
