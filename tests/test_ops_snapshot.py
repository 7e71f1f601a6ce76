"""Tests for the snapshot side of sfpo_megatron.ops: snapshot_ and its layout (the chunk planner
included); the host-streamed reposition is in test_ops_host_stream.py.

snapshot_ must write exactly torch.cat of the flattened sources (both backends, bit for bit).
"""

import logging

import pytest
import torch
from test_ops import _C, ODD_SIZES, assert_same_bits, needs_ext

from sfpo_megatron import ops
from sfpo_megatron.ops import _fallback

SNAPSHOT_IMPLS = [
    pytest.param(lambda *a: _C.snapshot_(*a), id="extension", marks=needs_ext),
    pytest.param(_fallback.snapshot_, id="torch"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_bits(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """fp32 tensors of arbitrary bit patterns (NaN payloads, -0, subnormals): copies keep them."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(-(2**31), 2**31, (n,), generator=g).int().view(torch.float32) for n in sizes
    ]


def nan_flat(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"))


@pytest.mark.parametrize("impl", SNAPSHOT_IMPLS)
def test_snapshot_equals_cat_bitwise(impl):
    small = torch.randint(0, 65, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    srcs = random_bits(ODD_SIZES + small + [0, 3_000_001])
    srcs[3] = srcs[3].view(31, 33)  # only element counts matter, not shapes
    expected = torch.cat([s.flatten() for s in srcs])
    flat = nan_flat(expected.numel() + 11)
    version = flat._version
    impl(srcs, flat)
    assert_same_bits(flat[: expected.numel()], expected)
    assert flat[expected.numel() :].isnan().all(), "elements past the total must stay untouched"
    assert flat._version > version


@needs_ext
def test_snapshot_extension_matches_fallback_on_one_large_tensor():
    srcs = random_bits([5_000_003], seed=2)
    ours, theirs = nan_flat(5_000_003), nan_flat(5_000_003)
    _C.snapshot_(srcs, ours)
    _fallback.snapshot_(srcs, theirs)
    assert_same_bits(ours, theirs)


def _srcs(*sizes: int) -> list[torch.Tensor]:
    return [torch.randn(n) for n in sizes]


SNAPSHOT_ERRORS = {
    "src dtype": (
        lambda: ([torch.randn(3), torch.randn(3).double()], nan_flat(6)),
        TypeError,
        r"srcs\[1\] must be float32",
    ),
    "src devices": (
        lambda: ([torch.randn(3), torch.empty(3, device="meta")], nan_flat(6)),
        ValueError,
        r"srcs\[1\] is on meta but srcs\[0\] is on cpu",
    ),
    "src contiguity": (
        lambda: ([torch.randn(4, 4).t()], nan_flat(16)),
        ValueError,
        r"srcs\[0\] must be contiguous",
    ),
    "flat device": (
        lambda: (_srcs(3), torch.empty(3, device="meta")),
        ValueError,
        r"flat is on meta but srcs\[0\] is on cpu; flat must be on the same device, or on the CPU",
    ),
    "flat dtype": (
        lambda: (_srcs(3), torch.zeros(3, dtype=torch.bfloat16)),
        TypeError,
        r"flat must be float32",
    ),
    "flat rank": (
        lambda: (_srcs(3), nan_flat(8).view(2, 4)),
        ValueError,
        r"flat must be 1-D, got shape \[2, 4\]",
    ),
    "flat contiguity": (
        lambda: (_srcs(3), nan_flat(8)[::2]),
        ValueError,
        r"flat must be contiguous",
    ),
    "flat size": (
        lambda: (_srcs(3, 4, 5), nan_flat(11)),
        ValueError,
        r"flat has 11 elements but 12 are needed",
    ),
}


@pytest.mark.parametrize("impl", SNAPSHOT_IMPLS)
@pytest.mark.parametrize("case", list(SNAPSHOT_ERRORS))
def test_snapshot_invalid_arguments_give_clear_errors(impl, case):
    build, error, message = SNAPSHOT_ERRORS[case]
    srcs, flat = build()
    before = flat.clone()
    with pytest.raises(error, match=r"^snapshot_: " + message):
        impl(srcs, flat)
    if flat.device.type == "cpu":  # validation happens before any write
        assert_same_bits(flat, before)


@pytest.mark.parametrize("impl", SNAPSHOT_IMPLS)
def test_snapshot_of_nothing_still_checks_flat(impl):
    impl([], torch.empty(0))
    with pytest.raises(TypeError, match="flat must be float32"):
        impl([], torch.empty(0, dtype=torch.float64))


@needs_ext
def test_snapshot_extension_rejects_unsupported_device():
    meta = torch.empty(4, device="meta")
    with pytest.raises(RuntimeError, match="tensors on meta are not supported"):
        _C.snapshot_([meta], meta)


@needs_ext
def test_public_snapshot_dispatches_to_extension(monkeypatch):
    monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)

    def fail(*args):
        raise AssertionError("the fallback must not run when the extension is available")

    monkeypatch.setattr(ops._fallback, "snapshot_", fail)
    srcs = random_bits([7, 4099], seed=3)
    flat = nan_flat(4106)
    ops.snapshot_(tuple(srcs), flat)
    assert_same_bits(flat, torch.cat(srcs))


def test_missing_extension_warns_once_for_all_ops(monkeypatch, caplog):
    monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_warned", False)
    srcs = random_bits([3, 5], seed=4)
    flat = nan_flat(8)
    with caplog.at_level(logging.WARNING, logger="sfpo_megatron.ops"):
        ops.snapshot_(srcs, flat)
        ops.snapshot_(srcs, flat)
        ops.reposition_([torch.randn(8)], [flat], None, 0.5)
    assert_same_bits(flat, torch.cat(srcs))
    records = [r for r in caplog.records if r.name == "sfpo_megatron.ops"]
    assert len(records) == 1 and "not built" in records[0].getMessage()


def test_snapshot_views_layout():
    like = [torch.empty(2, 3), torch.empty(0), torch.empty(5), torch.empty(1, 1)]
    flat = torch.arange(20, dtype=torch.float32)
    views = ops.snapshot_views(flat, like)
    assert [v.shape for v in views] == [(6,), (0,), (5,), (1,)]
    assert [v.storage_offset() for v in views] == [0, 6, 6, 11]
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)
    assert views[2].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0]
    views[3].fill_(-1.0)  # writes land in flat
    assert flat[11] == -1.0 and flat[12] == 12.0
    with pytest.raises(ValueError, match=r"^snapshot_views: flat has 11 elements but 12 are"):
        ops.snapshot_views(flat[:11], like)


@pytest.mark.parametrize(
    ("numels", "start", "stop", "expected"),
    [
        ([5, 0, 3, 4], 0, 12, [(0, 0, 5), (2, 0, 3), (3, 0, 4)]),  # everything, empty skipped
        ([5, 0, 3, 4], 3, 7, [(0, 3, 2), (2, 0, 2)]),  # a chunk spanning tensors
        ([5, 0, 3, 4], 5, 8, [(2, 0, 3)]),  # exactly one tensor's boundaries
        ([5, 0, 3, 4], 6, 7, [(2, 1, 1)]),  # inside one tensor
        ([5, 0, 3, 4], 4, 9, [(0, 4, 1), (2, 0, 3), (3, 0, 1)]),
        ([5, 0, 3, 4], 5, 5, []),  # empty range
        ([10], 0, 4, [(0, 0, 4)]),  # a tensor spanning chunks...
        ([10], 4, 8, [(0, 4, 4)]),
        ([10], 8, 10, [(0, 8, 2)]),
        ([0, 0, 2], 0, 2, [(2, 0, 2)]),
        ([], 0, 0, []),
    ],
)
def test_chunk_segments_hand_cases(numels, start, stop, expected):
    assert ops.chunk_segments(numels, start, stop) == expected


@pytest.mark.parametrize(("start", "stop"), [(-1, 2), (3, 2), (0, 13)])
def test_chunk_segments_rejects_bad_ranges(start, stop):
    with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= 12"):
        ops.chunk_segments([5, 0, 3, 4], start, stop)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000])
def test_chunk_segments_cover_every_element_once_in_order(chunk):
    numels = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(chunk)).tolist()
    total = sum(numels)
    pieces = []
    for start in range(0, total, chunk):
        segments = ops.chunk_segments(numels, start, min(start + chunk, total))
        assert sum(length for _, _, length in segments) == min(chunk, total - start)
        pieces += segments
    covered = [(i, offset + k) for i, offset, length in pieces for k in range(length)]
    assert covered == [(i, k) for i, n in enumerate(numels) for k in range(n)]


@needs_cuda
@pytest.mark.parametrize("impl", SNAPSHOT_IMPLS)
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_snapshot_to_host_and_device(impl, pinned):
    srcs = [t.cuda() for t in random_bits([5, 0, 4097, 1 << 20], seed=6)]
    expected = torch.cat([s.cpu() for s in srcs])
    host = nan_flat(expected.numel()).pin_memory() if pinned else nan_flat(expected.numel())
    device = nan_flat(expected.numel()).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        impl(srcs, host)
        impl(srcs, device)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    assert_same_bits(host, expected)
    assert_same_bits(device.cpu(), expected)
