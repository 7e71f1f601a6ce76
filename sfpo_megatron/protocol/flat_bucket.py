"""One bucket of named tensors as one flat uint8 buffer, in SGLang's ``flattened_bucket`` layout
(sglang 0.5.23 ``srt/weight_sync/tensor_bucket.py``): tensors back to back in ``names`` order,
no padding, each starting at a multiple of its element size; dtypes by torch attribute name.

Sorting by descending element size makes every start aligned without padding (each size
divides the larger ones before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatBucket:
    buffer: torch.Tensor
    """1-D uint8."""
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]


def flatten(bucket: list[tuple[str, torch.Tensor]]) -> FlatBucket:
    ordered = sorted(bucket, key=lambda item: -item[1].element_size())
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in ordered]
    buffer = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return FlatBucket(
        buffer=buffer,
        names=[name for name, _ in ordered],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in ordered],
        shapes=[list(t.shape) for _, t in ordered],
    )


def layout(dtypes: list[str], shapes: list[list[int]]) -> list[tuple[torch.dtype, int, int]]:
    """(dtype, start, stop) byte ranges, checked as the engine checks them."""
    ranges, offset = [], 0
    for name, shape in zip(dtypes, shapes, strict=True):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype name {name!r} (use torch attribute names)")
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        size = dtype.itemsize
        if offset % size:
            raise ValueError(f"unaligned tensor: offset {offset} is not a multiple of {size}")
        stop = offset + size * int(torch.Size(shape).numel())
        ranges.append((dtype, offset, stop))
        offset = stop
    return ranges


def unflatten(
    buffer: torch.Tensor, names: list[str], dtypes: list[str], shapes: list[list[int]]
) -> list[tuple[str, torch.Tensor]]:
    ranges = layout(dtypes, shapes)
    total = ranges[-1][2] if ranges else 0
    if buffer.numel() != total:
        raise ValueError(f"flat buffer has {buffer.numel()} bytes, the metadata {total}")
    return [
        (name, buffer[start:stop].view(dtype).reshape(shape))
        for name, (dtype, start, stop), shape in zip(names, ranges, shapes, strict=True)
    ]


def total_bytes(dtypes: list[str], shapes: list[list[int]]) -> int:
    ranges = layout(dtypes, shapes)
    return ranges[-1][2] if ranges else 0
