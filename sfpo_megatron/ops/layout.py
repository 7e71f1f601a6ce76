"""The flat snapshot layout, defined once: tensor i occupies flat[off_i : off_i + numel_i].

Offsets start at 0 and are consecutive (no padding), so a snapshot written by ``snapshot_`` can be
read back by ``reposition_`` (through ``snapshot_views``) or streamed in chunks by
``reposition_from_host_`` (through ``chunk_segments``) without storing any offsets.
"""

from collections.abc import Sequence

import torch


def check_flat(flat: torch.Tensor, needed: int, label: str) -> None:
    """Validate a flat fp32 buffer; wording matches csrc/binding.cpp so both backends fail alike."""
    if flat.dtype != torch.float32:
        raise TypeError(f"{label} must be float32, got {flat.dtype}")
    if flat.dim() != 1:
        raise ValueError(f"{label} must be 1-D, got shape {list(flat.shape)}")
    if not flat.is_contiguous():
        raise ValueError(f"{label} must be contiguous")
    if flat.numel() < needed:
        raise ValueError(f"{label} has {flat.numel()} elements but {needed} are needed")


def snapshot_views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """1-D views of flat, one per tensor of ``like`` with its element count, laid out consecutively.

    The views share flat's storage, so they serve as ``snap`` for ``reposition_`` and as the
    destinations of ``snapshot_``.
    """
    numels = [t.numel() for t in like]
    check_flat(flat, sum(numels), "snapshot_views: flat")
    views, offset = [], 0
    for n in numels:
        views.append(flat[offset : offset + n])
        offset += n
    return views


def chunk_segments(numels: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The pieces of flat[start:stop] as (tensor index, offset within tensor, length), in order.

    Pieces are consecutive in the flat range, so their lengths also give their positions within
    a staging buffer holding flat[start:stop]. Empty tensors contribute no piece.
    """
    total = sum(numels)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"chunk_segments: need 0 <= start <= stop <= {total}, got {start}, {stop}")
    segments = []
    offset = 0
    for index, n in enumerate(numels):
        if offset >= stop:
            break
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            segments.append((index, lo - offset, hi - lo))
        offset += n
    return segments
