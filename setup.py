"""Build script for sfpo-megatron and its optional C++/CUDA extension ``sfpo_megatron._C``.

Install with ``pip install --no-build-isolation -e .``: build isolation would compile against a
freshly downloaded (CUDA) torch instead of the one installed here, whose ABI the extension must
match. Environment switches:

* ``SFPO_NO_EXTENSION=1``: build no extension; ``sfpo_megatron.ops`` uses its pure-torch fallback.
* ``SFPO_BUILD_CUDA=1``: require the CUDA kernels (error if impossible); ``0``: CPU kernels only.
  Unset: add CUDA kernels when torch was built with CUDA and nvcc is found.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to build for (default ``9.0``).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Relative paths: setuptools rejects absolute source paths in some install modes.
CPU_SOURCES = ["csrc/binding.cpp", "csrc/reposition_cpu.cpp"]
CUDA_SOURCES = ["csrc/reposition.cu"]
# No FMA contraction, so results stay bit-identical to torch's separately rounded ops.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _want_cuda(torch_version_cuda: str | None, cuda_home: str | None) -> bool:
    """Decide whether to compile the CUDA kernels, honouring SFPO_BUILD_CUDA."""
    flag = os.environ.get("SFPO_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"SFPO_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    problem = None
    if torch_version_cuda is None:
        problem = "the installed torch was built without CUDA"
    elif cuda_home is None:
        problem = "nvcc / CUDA_HOME was not found"
    if problem is not None and flag == "1":
        raise RuntimeError(f"SFPO_BUILD_CUDA=1 but {problem}")
    if problem is not None:
        print(f"sfpo-megatron: building CPU kernels only ({problem})")
    return problem is None


def _extension_build() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass); empty when the extension is disabled or cannot be built."""
    if os.environ.get("SFPO_NO_EXTENSION", "").strip() == "1":
        print("sfpo-megatron: SFPO_NO_EXTENSION=1, skipping the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        print(f"sfpo-megatron: torch is not importable ({exc}); skipping the C++ extension")
        return [], {}

    if _want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME):
        # BuildExtension reads the arch list from the environment.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = cpp_extension.CUDAExtension(
            name="sfpo_megatron._C",
            sources=CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS + ["-DSFPO_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        )
    else:
        ext = cpp_extension.CppExtension(
            name="sfpo_megatron._C",
            sources=CPU_SOURCES,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="sfpo-megatron",
    version="0.1.0",
    description="Slow-Fast Policy Optimization trainer on Megatron-Core",
    packages=find_packages(include=["sfpo_megatron", "sfpo_megatron.*"]),
    python_requires=">=3.11",
    # Bounds: see "Dependencies" in README.md. CI installs the newest versions these allow.
    install_requires=[
        "torch>=2.5,<3",
        "megatron-core==0.16.1",
        "numpy>=1.26,<3",
        "pyyaml>=6,<7",
        "math-verify>=0.9,<0.10",
        "transformers>=5.23,<5.26",
        "safetensors>=0.4,<1",
        "psutil>=5.9,<8",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "ruff>=0.17,<0.18",
            "pyarrow>=14,<27",
            "matplotlib>=3.8,<4",
            "tensorboard>=2.15,<3",
        ],
        "parquet": ["pyarrow>=14,<27"],
        "plot": ["matplotlib>=3.8,<4"],
        "sglang": ["sglang==0.5.23"],
    },
    entry_points={"console_scripts": ["sfpo-megatron = sfpo_megatron.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
