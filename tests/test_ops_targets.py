"""The hardware the extension is built for and runs on: CPU kernels cloned per ISA without FMA
contraction; GPU architectures (the rules, setup.py's default list, and the single-notice fallback
to torch on a GPU the kernels were not built for, simulated on the CPU with a stand-in extension).
"""

import ast
import logging
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ops import _C, REPO, needs_ext

from sfpo_megatron import ops
from sfpo_megatron.ops.cuda_arch import unsupported_reason

A100, A10, L40S, H100, B200, RTX5090 = (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)


def setup_constant(name: str):
    """A constant of setup.py, read without running setup.py."""
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or sys.platform != "linux", reason="ISA clones: x86-64 Linux"
)
def test_cpu_kernel_is_cloned_per_isa_and_never_fuses_multiply_add(tmp_path):
    cxx, objdump = shutil.which("c++") or shutil.which("g++"), shutil.which("objdump")
    if cxx is None or objdump is None:
        pytest.skip("needs a C++ compiler and objdump")
    obj = tmp_path / "kernel.o"
    flags = ["-std=c++17", *setup_constant("CXX_FLAGS"), "-c", "csrc/reposition_cpu.cpp"]
    subprocess.run([cxx, *flags, "-o", str(obj)], cwd=REPO, check=True, timeout=300)
    listing = subprocess.run(
        [objdump, "-d", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    for isa in ("avx512f", "avx2", "default"):
        assert f"repos_bfloat16EPfPKfPtfll.{isa}>:" in listing
    # An FMA rounds alpha * d + snap once instead of twice: results would differ from torch's.
    assert not re.search(r"\svfn?m(add|sub)", listing)


@pytest.mark.parametrize(
    ("archs", "capability", "runs"),
    [
        ("9.0", A100, False),  # the old default: every non-Hopper GPU failed mid-run
        ("9.0", L40S, False),
        ("9.0", B200, False),
        ("9.0+PTX", B200, True),  # PTX is compiled by the driver for newer GPUs
        ("9.0+PTX", A100, False),  # ... never for older ones
        ("8.0", A10, True),  # machine code runs on later minors of its major
        ("8.6", A100, False),
        ("8.0", H100, False),  # ... not on another major
        ("9.0a", H100, True),  # arch-specific code runs on that GPU alone
        ("9.0a+PTX", B200, False),
        ("7.5 8.0", A100, True),  # TORCH_CUDA_ARCH_LIST also separates with spaces
        ("Hopper", A100, True),  # named entries are not interpreted: trusted
        ("", A100, True),
    ],
)
def test_architecture_rules(archs, capability, runs):
    reason = unsupported_reason(archs, capability)
    assert (reason is None) == runs
    if not runs:
        assert repr(archs) in reason and f"{capability[0]}.{capability[1]}" in reason


@pytest.mark.parametrize("capability", [A100, A10, (8, 7), L40S, H100, B200, (10, 3), RTX5090])
def test_default_list_covers_current_gpus_and_has_ptx(capability):
    archs = setup_constant("DEFAULT_CUDA_ARCHS")
    assert archs.endswith("+PTX")
    assert unsupported_reason(archs, capability) is None
    assert unsupported_reason(archs, (13, 0)) is None  # a GPU newer than the list: through PTX


class FakeCudaExtension:
    """A CUDA build of _C made for ``archs``; its kernels must not run in these tests."""

    def __init__(self, archs: str) -> None:
        self.archs = archs

    def has_cuda(self) -> bool:
        return True

    def cuda_archs(self) -> str:
        return self.archs

    def reposition_(self, *args) -> None:
        raise AssertionError("the extension must not run on a GPU it was not built for")


@pytest.fixture
def simulated_gpu(monkeypatch):
    """Install a fake extension and GPU: returns a setter and the capability queries made."""
    queries = []

    def install(archs: str, capability: tuple[int, int]) -> list[int]:
        monkeypatch.delenv("SFPO_OPS_BACKEND", raising=False)
        monkeypatch.setattr(ops, "_C", FakeCudaExtension(archs))
        monkeypatch.setattr(ops, "_warned", False)
        monkeypatch.setattr(ops, "_cuda_problems", {})

        def get_capability(index):
            queries.append(index)
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
        return queries

    return install


def fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sfpo_megatron.ops"]


def test_unsupported_gpu_falls_back_to_torch_with_one_notice(simulated_gpu, caplog):
    queries = simulated_gpu("9.0", A100)
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="sfpo_megatron.ops"):
        assert ops.backend(gpu) == "torch"
        assert not ops._use_extension(gpu)
        assert not ops._use_extension(gpu)
    assert ops.backend() == "extension-cuda"  # built with CUDA, just not for this GPU
    assert queries == [0], "the architecture is checked once per GPU"
    records = fallback_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "'9.0'" in message and "compute capability 8.0" in message
    assert "pure-torch fallback" in message and "TORCH_CUDA_ARCH_LIST" in message


def test_supported_gpu_uses_the_extension_silently(simulated_gpu, caplog):
    simulated_gpu("8.0;9.0+PTX", B200)
    with caplog.at_level(logging.WARNING, logger="sfpo_megatron.ops"):
        assert ops.backend("cuda:0") == "extension-cuda"
        assert ops._use_extension(torch.device("cuda", 0))
    assert not fallback_records(caplog)


def test_cpu_tensors_are_not_checked_against_gpu_architectures(simulated_gpu):
    queries = simulated_gpu("9.0", A100)
    assert ops._use_extension(torch.device("cpu"))
    assert queries == []


@needs_ext
def test_built_extension_reports_its_architectures():
    assert (_C.cuda_archs() != "") == _C.has_cuda()


@needs_ext
@pytest.mark.skipif(
    sys.platform != "linux" or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's Linux OpenMP builds",
)
def test_cpu_kernels_run_on_torchs_openmp_threads():
    # Without -fopenmp, at::parallel_for (a header) silently runs on one thread.
    assert b"GOMP_parallel" in Path(_C.__file__).read_bytes()
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert len({line.split()[-1] for line in maps if "libgomp" in line}) == 1, "one OpenMP pool"
