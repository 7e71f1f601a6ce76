"""Tests for sfpo_megatron.ops: extension vs pure-torch fallback, conversions, errors, builds.

The extension and the fallback must agree bit for bit, so a run may switch backends (or fall back
when the extension is missing) without changing a single weight.
"""

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sfpo_megatron import ops
from sfpo_megatron.ops import _fallback

try:
    from sfpo_megatron import _C
except ImportError as exc:
    _C = None
    _C_SKIP = f"sfpo_megatron._C is not built ({exc}); run pip install --no-build-isolation -e ."
else:
    _C_SKIP = ""

needs_ext = pytest.mark.skipif(_C is None, reason=_C_SKIP)

REPO = Path(__file__).resolve().parents[1]
MODEL_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]
ALPHAS = [0.0, 0.8, 1.0]
# torch's x86 vector kernels (AVX2/AVX512) write bf16 NaN as 0xFFFF, as the extension does; its
# generic kernel writes 0x7FC0, so elsewhere only NaN-ness of bf16 outputs can be compared.
BF16_NAN_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

IMPLS = [
    pytest.param(lambda *a: _C.reposition_(*a), id="extension", marks=needs_ext),
    pytest.param(_fallback.reposition_, id="torch"),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, nan_exact: bool = True) -> None:
    """Bitwise equality (stricter than torch.equal: sees -0 vs +0 and NaN encodings)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = _bits(actual), _bits(expected)
    if not nan_exact:
        nan = actual.float().isnan()
        assert torch.equal(nan, expected.float().isnan()), "NaN positions differ"
        a, e = a[~nan], e[~nan]
    assert torch.equal(a, e), f"{int((a != e).sum())} of {a.numel()} elements differ"


def make_case(
    sizes: list[int], model_dtype: torch.dtype | None, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Random fp32 weights spanning 2^-24..2^24 (fp16 subnormals and overflow) and a snapshot."""
    g = torch.Generator().manual_seed(seed)
    main, snap = [], []
    for n in sizes:
        scale = torch.exp2(torch.randint(-24, 25, (n,), generator=g).float())
        m = torch.randn(n, generator=g) * scale
        main.append(m)
        noise = torch.randn(2, n, generator=g)
        snap.append(m * (1 + 0.01 * noise[0]) + 1e-3 * noise[1])
    model = None
    if model_dtype is not None:
        model = [torch.full((n,), float("nan"), dtype=model_dtype) for n in sizes]
    return main, snap, model


def run(impl, main, snap, model, alpha):
    """Apply impl to clones so the inputs can be reused for the other backend."""
    main = [t.clone() for t in main]
    model = None if model is None else [t.clone() for t in model]
    impl(main, snap, model, alpha)
    return main, model


def assert_runs_identical(main, snap, model, alpha) -> None:
    ext_main, ext_model = run(_C.reposition_, main, snap, model, alpha)
    ref_main, ref_model = run(_fallback.reposition_, main, snap, model, alpha)
    for i, (a, b) in enumerate(zip(ext_main, ref_main, strict=True)):
        assert_same_bits(a, b)
        if model is not None:
            nan_exact = BF16_NAN_EXACT or model[i].dtype != torch.bfloat16
            assert_same_bits(ext_model[i], ref_model[i], nan_exact=nan_exact)


ODD_SIZES = [1, 3, 7, 1023, 4097, 4098]


@needs_ext
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=str)
def test_extension_matches_fallback_bitwise(model_dtype, alpha):
    small = torch.randint(1, 65, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    main, snap, model = make_case(ODD_SIZES + small + [3_000_001], model_dtype)
    assert_runs_identical(main, snap, model, alpha)


@needs_ext
def test_mixed_model_dtypes_in_one_call():
    main, snap, _ = make_case(ODD_SIZES, None, seed=2)
    dtypes = [torch.bfloat16, torch.float16, torch.float32] * 2
    model = [torch.zeros(t.numel(), dtype=d) for t, d in zip(main, dtypes, strict=True)]
    assert_runs_identical(main, snap, model, 0.8)


INF, NAN = float("inf"), float("nan")
SPECIALS = [
    *(0.0, -0.0, 1.0, -1.0, 0.8, INF, -INF, NAN),
    # fp16 overflow (65520 rounds to inf), fp32 extremes, bf16 max
    *(65504.0, 65519.0, 65520.0, -65520.0, 1e5, 3.0e38, -3.4028234663852886e38),
    3.3895313892515355e38,
    # fp32 min normal and subnormals
    *(1.1754943508222875e-38, 1e-40, -1.401298464324817e-45),
    # fp16 min normal, subnormal range and its round-to-zero boundary
    *(2.0**-14, 6.1e-05, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26),
    # bf16 and fp16 ties
    *(1.00390625, 1.01171875, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11),
]


@needs_ext
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=str)
def test_special_values_bitwise(model_dtype, alpha):
    values = torch.tensor(SPECIALS, dtype=torch.float32)
    main = [values.repeat_interleave(len(SPECIALS))]  # every (main, snap) pair
    snap = [values.repeat(len(SPECIALS))]
    model = None if model_dtype is None else [torch.zeros(main[0].numel(), dtype=model_dtype)]
    assert_runs_identical(main, snap, model, alpha)


def _conversion_inputs() -> torch.Tensor:
    """Float bit patterns around every bf16 and fp16 rounding boundary, plus random ones."""
    g = torch.Generator().manual_seed(3)
    bf16 = (torch.arange(1 << 16) << 16)[:, None] | torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001])
    fp16 = (torch.arange(1 << 19) << 13)[:, None] | torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001])
    ties = []  # fp16 subnormal results round at bit 14..24 of the fp32 significand
    for exponent in range(102, 113):
        shift = 126 - exponent
        k = torch.randint(0, 1 << (24 - shift), (2000,), generator=g)
        tie = ((k << shift) | (1 << (shift - 1))) & 0x7FFFFF | (exponent << 23)
        ties += [tie - 1, tie, tie + 1, tie | (1 << 31)]
    rand = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g)
    bits = torch.cat([bf16.flatten(), fp16.flatten(), *ties, rand])
    return bits.to(torch.int32).view(torch.float32)


@needs_ext
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conversion_matches_torch_to(model_dtype):
    main = _conversion_inputs()
    model = torch.empty(main.numel(), dtype=model_dtype)
    # alpha=1, snap=0 keeps each value (bar -0 -> +0 and quieted sNaN), so model = main.to(dtype).
    _C.reposition_([main], [torch.zeros_like(main)], [model], 1.0)
    nan_exact = BF16_NAN_EXACT or model_dtype != torch.bfloat16
    assert_same_bits(model, main.to(model_dtype), nan_exact=nan_exact)


@needs_ext
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_negative_zero_converts_to_negative_zero(model_dtype):
    main = torch.tensor([-1.0, -2.0])
    model = torch.empty(2, dtype=model_dtype)
    # alpha=0: 0 * d = -0 for negative d = main - snap, and -0 + -0 = -0.
    _C.reposition_([main], [torch.tensor([-0.0, -0.0])], [model], 0.0)
    assert_same_bits(model, torch.tensor([-0.0, -0.0], dtype=model_dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", ALPHAS + [0.3, 1.7])
def test_formula_against_float64_reference(impl, alpha):
    g = torch.Generator().manual_seed(4)
    main64 = torch.randn(100_003, generator=g, dtype=torch.float64) * 100
    snap64 = main64 + torch.randn(100_003, generator=g, dtype=torch.float64)
    main, snap = main64.float(), snap64.float()
    out, _ = run(impl, [main], [snap], None, alpha)
    a = float(torch.tensor(alpha, dtype=torch.float32))  # alpha is rounded to fp32
    step = a * (main.double() - snap.double())
    ref = snap.double() + step
    # Three roundings (sub, mul, add), each within 2^-24 relative: bound by 2^-23 with slack.
    bound = 2.0**-23 * (ref.abs() + 2 * step.abs())
    assert ((out[0].double() - ref).abs() <= bound).all()
    if alpha == 0.0:
        assert torch.equal(out[0], snap)


def _valid(n: int = 4) -> torch.Tensor:
    return torch.randn(n)


ERROR_CASES = {
    "list length": (
        lambda: ([_valid(), _valid()], [_valid()], None),
        ValueError,
        r"main and snap must have the same length, got 2 and 1",
    ),
    "model length": (
        lambda: ([_valid(), _valid()], [_valid(), _valid()], [_valid()]),
        ValueError,
        r"model must have the same length as main, got 1 and 2",
    ),
    "main dtype": (
        lambda: ([_valid(), _valid().bfloat16()], [_valid(), _valid()], None),
        TypeError,
        r"main\[1\] must be float32",
    ),
    "snap dtype": (
        lambda: ([_valid()], [_valid().double()], None),
        TypeError,
        r"snap\[0\] must be float32",
    ),
    "model dtype": (
        lambda: ([_valid()], [_valid()], [torch.zeros(4, dtype=torch.int32)]),
        TypeError,
        r"model\[0\] must be float32, bfloat16 or float16",
    ),
    "snap size": (
        lambda: ([_valid(), _valid(6)], [_valid(), _valid(5)], None),
        ValueError,
        r"snap\[1\] has 5 elements but main\[1\] has 6",
    ),
    "model size": (
        lambda: ([_valid()], [_valid()], [torch.zeros(3, dtype=torch.bfloat16)]),
        ValueError,
        r"model\[0\] has 3 elements but main\[0\] has 4",
    ),
    "contiguity": (
        lambda: ([torch.randn(4, 4).t()], [torch.randn(4, 4)], None),
        ValueError,
        r"main\[0\] must be contiguous",
    ),
    "device": (
        lambda: ([_valid()], [torch.empty(4, device="meta")], None),
        ValueError,
        r"snap\[0\] is on meta but main\[0\] is on cpu",
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_invalid_arguments_give_clear_errors(impl, case):
    build, error, message = ERROR_CASES[case]
    main, snap, model = build()
    before = [t.clone() for t in main]
    with pytest.raises(error, match=r"^reposition_: " + message):
        impl(main, snap, model, 0.5)
    for t, b in zip(main, before, strict=True):  # validation happens before any write
        assert_same_bits(t, b)


@needs_ext
def test_extension_rejects_unsupported_device():
    meta = [torch.empty(4, device="meta")]
    with pytest.raises(RuntimeError, match="tensors on meta are not supported"):
        _C.reposition_(meta, meta, None, 0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_inputs_and_shapes(impl):
    impl([], [], None, 0.5)
    impl([torch.empty(0)], [torch.empty(0)], [torch.empty(0, dtype=torch.bfloat16)], 0.5)
    # Only element counts must match: tensors are treated as flat.
    main, snap = torch.randn(4, 5), torch.randn(20)
    model = torch.empty(5, 4, dtype=torch.bfloat16)
    expected = snap + 0.5 * (main.flatten() - snap)
    impl([main], [snap], [model], 0.5)
    assert torch.equal(main.flatten(), expected)
    assert torch.equal(model.flatten(), expected.bfloat16())


@pytest.mark.parametrize("impl", IMPLS)
def test_parameters_requiring_grad_are_updated_and_versioned(impl):
    main = torch.nn.Parameter(torch.randn(8))
    model = torch.zeros(8, dtype=torch.bfloat16)
    main_version, model_version = main._version, model._version
    impl([main], [torch.zeros(8)], [model], 0.5)
    assert main._version > main_version and model._version > model_version
    assert torch.equal(model, main.detach().bfloat16())


@needs_ext
def test_backend_uses_extension_by_default(monkeypatch):
    monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)
    assert ops.extension_available()
    assert ops.backend() == ("extension-cuda" if _C.has_cuda() else "extension-cpu")


def test_env_forces_torch_fallback_without_warning(monkeypatch, caplog):
    monkeypatch.setenv("SFPO_OPS_BACKEND", "torch")
    monkeypatch.setattr(ops, "_warned", False)
    assert ops.backend() == "torch"
    main, snap, model = make_case([5, 9], torch.float16, seed=5)
    expected_main, expected_model = run(_fallback.reposition_, main, snap, model, 0.8)
    with caplog.at_level(logging.WARNING, logger="sfpo_megatron.ops"):
        ops.reposition_(main, snap, model, 0.8)
    assert not caplog.records
    for got, want in zip(main + model, expected_main + expected_model, strict=True):
        assert_same_bits(got, want)


def test_invalid_backend_env_is_rejected(monkeypatch):
    monkeypatch.setenv("SFPO_OPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SFPO_OPS_BACKEND"):
        ops.backend()


def test_missing_extension_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_warned", False)
    assert ops.backend() == "torch" and not ops.extension_available()
    main, snap, model = make_case([3], torch.bfloat16, seed=6)
    expected_main, expected_model = run(_fallback.reposition_, main, snap, model, 0.8)
    with caplog.at_level(logging.WARNING, logger="sfpo_megatron.ops"):
        ops.reposition_(tuple(main), tuple(snap), model, 0.8)
        assert_same_bits(main[0], expected_main[0])
        assert_same_bits(model[0], expected_model[0])
        ops.reposition_(main, snap, model, 0.8)
    records = [r for r in caplog.records if r.name == "sfpo_megatron.ops"]
    assert len(records) == 1
    assert "not built" in records[0].getMessage()
    assert "pip install --no-build-isolation -e ." in records[0].getMessage()


@needs_ext
def test_public_face_dispatches_to_extension(monkeypatch):
    monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)

    def fail(*args):
        raise AssertionError("the fallback must not run when the extension is available")

    monkeypatch.setattr(ops._fallback, "reposition_", fail)
    main, snap, model = make_case([7, 4099], torch.bfloat16, seed=7)
    expected_main, expected_model = run(_C.reposition_, main, snap, model, 0.8)
    ops.reposition_(main, snap, model, 0.8)
    for got, want in zip(main + model, expected_main + expected_model, strict=True):
        assert_same_bits(got, want)


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        reason = "nvcc not found on PATH; cannot compile csrc/reposition.cu"
        print(reason)
        pytest.skip(reason)
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "--fmad=false", "-c", "csrc/reposition.cu"]
    result = subprocess.run(
        cmd + ["-o", str(tmp_path / "r.o")], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.o").stat().st_size > 0


def test_cpu_kernel_compiles_without_torch(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        reason = "no C++ compiler found on PATH"
        print(reason)
        pytest.skip(reason)
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-c"]
    result = subprocess.run(
        [cxx, *flags, "csrc/reposition_cpu.cpp", "-o", str(tmp_path / "c.o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
