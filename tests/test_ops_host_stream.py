"""The host-streamed reposition (``snapshot.placement: host``) on the CPU: the chunking and the
copy/compute ordering are the code CUDA runs (ops.host_stream.reposition_chunked_), driven here by
CPU copy engines, so these tests cover it without a GPU.

reposition_from_host_ must give exactly what reposition_ gives with the whole snapshot at hand,
whatever the chunking.
"""

import pytest
import torch
from test_ops import MODEL_DTYPES, assert_same_bits, make_case, run

from sfpo_megatron import ops
from sfpo_megatron.ops import _fallback, host_stream

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nan_flat(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"))


HOST_SIZES = [1, 3, 0, 7, 64, 1023, 2, 4097]


def _host_case(model_dtype, seed):
    """(main, host_flat with the snapshot, model); main[4] is 2-D to check shape handling."""
    main, snap, model = make_case(HOST_SIZES, model_dtype, seed=seed)
    main[4] = main[4].view(8, 8)
    host_flat = nan_flat(sum(HOST_SIZES) + 5)
    _fallback.snapshot_(snap, host_flat)
    return main, host_flat, model


def assert_outputs_identical(got, want) -> None:
    """Compare (main, model) pairs as returned by test_ops.run, bit for bit."""
    got_main, got_model = got
    want_main, want_model = want
    assert (got_model is None) == (want_model is None)
    for a, b in zip(got_main + (got_model or []), want_main + (want_model or []), strict=True):
        assert_same_bits(a, b)


def from_host(host_flat: torch.Tensor, chunk: int, force_chunked: bool = True):
    """reposition_from_host_ in test_ops.run's impl signature (its snap argument is ignored)."""

    def impl(main, _snap, model, alpha):
        ops.reposition_from_host_(main, host_flat, model, alpha, chunk, force_chunked=force_chunked)

    return impl


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=str)
def test_reposition_from_host_chunked_matches_reposition(chunk, model_dtype):
    main, host_flat, model = _host_case(model_dtype, seed=chunk)
    expected = run(ops.reposition_, main, ops.snapshot_views(host_flat, main), model, 0.8)
    assert_outputs_identical(run(from_host(host_flat, chunk), main, None, model, 0.8), expected)


@pytest.mark.parametrize("chunk", [7, 1 << 23])
@pytest.mark.parametrize("force_chunked", [False, True])
def test_reposition_from_host_with_torch_backend(monkeypatch, chunk, force_chunked):
    monkeypatch.setenv("SFPO_OPS_BACKEND", "torch")
    main, host_flat, model = _host_case(torch.bfloat16, seed=5)
    expected = run(_fallback.reposition_, main, ops.snapshot_views(host_flat, main), model, 0.3)
    got = run(from_host(host_flat, chunk, force_chunked), main, None, model, 0.3)
    assert_outputs_identical(got, expected)


def test_reposition_from_host_updates_parameters():
    main = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    model = [torch.zeros(5, 3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    host_flat = torch.zeros(19)
    ops.reposition_from_host_(main, host_flat, model, 0.5, 4, force_chunked=True)
    for m, mo in zip(main, model, strict=True):
        assert torch.equal(mo, m.detach().bfloat16())


HOST_ERRORS = {
    "chunk size": (dict(chunk_elements=0), ValueError, r"chunk_elements must be >= 1, got 0"),
    "host device": (
        dict(host_flat=torch.empty(12, device="meta")),
        ValueError,
        r"host_flat must be on the CPU, got meta",
    ),
    "host size": (dict(host_flat=torch.zeros(11)), ValueError, r"host_flat has 11 elements but 12"),
    "host dtype": (
        dict(host_flat=torch.zeros(12).double()),
        TypeError,
        r"host_flat must be float32",
    ),
    "model size": (
        dict(model=[torch.zeros(5, dtype=torch.bfloat16), torch.zeros(6, dtype=torch.bfloat16)]),
        ValueError,
        r"model\[1\] has 6 elements but main\[1\] has 7",
    ),
}


@pytest.mark.parametrize("case", list(HOST_ERRORS))
def test_reposition_from_host_errors_before_writing(case):
    overrides, error, message = HOST_ERRORS[case]
    main = [torch.randn(5), torch.randn(7)]
    before = [t.clone() for t in main]
    kwargs = dict(host_flat=torch.zeros(12), model=None, chunk_elements=3) | overrides
    with pytest.raises(error, match=message):
        ops.reposition_from_host_(main, alpha=0.5, force_chunked=True, **kwargs)
    for t, b in zip(main, before, strict=True):
        assert_same_bits(t, b)


@needs_cuda
@pytest.mark.parametrize("chunk", [4096, 1 << 20, 1 << 23])
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16, torch.float16], ids=str)
def test_cuda_reposition_from_host_matches_device_snapshot(chunk, model_dtype):
    main, snap, model = make_case(HOST_SIZES + [3_000_001], model_dtype, seed=7)
    main = [t.cuda() for t in main]
    model = None if model is None else [t.cuda() for t in model]
    host_flat = torch.cat(snap).pin_memory()
    expected = run(ops.reposition_, main, ops.snapshot_views(host_flat.cuda(), main), model, 0.8)
    got = run(from_host(host_flat, chunk, force_chunked=False), main, None, model, 0.8)
    torch.cuda.synchronize()
    assert_outputs_identical(got, expected)


def buffer_of(t: torch.Tensor) -> int:
    """Which staging buffer a view belongs to."""
    return t.untyped_storage().data_ptr()


class DeferredCopyEngine(host_stream.SyncCopyEngine):
    """Runs each copy only when the compute waits for it, as late as a side stream may finish it:
    a reposition that did not wait for its chunk would read stale staging data."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.issued = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> int:
        self.issued += 1
        self.pending[self.issued] = (dst, src)
        return self.issued

    def wait(self, token: int) -> None:
        dst, src = self.pending.pop(token)
        dst.copy_(src)


class RecordingCopyEngine(host_stream.SyncCopyEngine):
    """Copies at once and logs every call; tokens are positions in the log."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def _add(self, *entry) -> int:
        self.log.append(entry)
        return len(self.log) - 1

    def mark(self) -> int:
        return self._add("mark")

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> int:
        super().copy(dst, src, after)
        return self._add("copy", buffer_of(dst), after)

    def wait(self, token: object) -> None:
        self._add("wait", token)


# Chunk sizes that divide none of the tensors (1023 = 3 x 11 x 31, 4097 = 17 x 241).
UNEVEN_CHUNKS = [5, 10, 1000, 4096]


def chunked(engine, main, host_flat, model, alpha, chunk):
    """reposition_chunked_ on clones of main/model, with the given engine."""
    main = [t.clone() for t in main]
    model = None if model is None else [t.clone() for t in model]
    host_stream.reposition_chunked_(main, host_flat, model, alpha, chunk, engine)
    return main, model


@pytest.mark.parametrize("chunk", UNEVEN_CHUNKS)
def test_chunked_loop_waits_for_every_copy(chunk):
    main, host_flat, model = _host_case(torch.bfloat16, seed=chunk + 1)
    expected = run(ops.reposition_, main, ops.snapshot_views(host_flat, main), model, 0.8)
    engine = DeferredCopyEngine()
    assert_outputs_identical(chunked(engine, main, host_flat, model, 0.8, chunk), expected)
    assert not engine.pending, "every copy is waited for"


@pytest.mark.parametrize("chunk", UNEVEN_CHUNKS)
def test_chunked_loop_orders_copies_and_repositions(monkeypatch, chunk):
    engine = RecordingCopyEngine()
    reposition = ops.reposition_

    def logged_reposition(main, snap, model, alpha):
        assert len({buffer_of(s) for s in snap}) == 1, "one chunk comes from one buffer"
        engine.log.append(("reposition", buffer_of(snap[0])))
        reposition(main, snap, model, alpha)

    monkeypatch.setattr(ops, "reposition_", logged_reposition)
    main, host_flat, model = _host_case(torch.float16, seed=chunk)
    expected = run(reposition, main, ops.snapshot_views(host_flat, main), model, 0.8)
    assert_outputs_identical(chunked(engine, main, host_flat, model, 0.8, chunk), expected)

    log = engine.log
    copies = [k for k, e in enumerate(log) if e[0] == "copy"]
    repositions = [k for k, e in enumerate(log) if e[0] == "reposition"]
    chunks = -(-sum(HOST_SIZES) // chunk)
    assert len(copies) == len(repositions) == chunks
    buffers = [log[k][1] for k in copies]
    assert len(set(buffers)) == min(chunks, 2)
    assert all(a != b for a, b in zip(buffers, buffers[1:], strict=False)), "buffers alternate"
    for c, k in enumerate(copies):
        _, buffer, after = log[k]
        assert log[after] == ("mark",)
        # The copy starts only once every earlier reposition reading its buffer is done...
        assert all(r < after for r in repositions if r < k and log[r][1] == buffer)
        # ... but not after the reposition of the previous chunk: that one it may overlap.
        if c > 0:
            assert after < repositions[c - 1]
        # The reposition of this chunk waits for this copy.
        assert ("wait", k) in log[k : repositions[c]]
