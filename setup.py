"""Build script for sfpo-megatron and its optional C++/CUDA extension ``sfpo_megatron._C``.

Install with ``pip install --no-build-isolation -e .``: build isolation would compile against a
freshly downloaded (CUDA) torch instead of the one installed here, whose ABI the extension must
match. Environment switches:

* ``SFPO_NO_EXTENSION=1``: build no extension; ``sfpo_megatron.ops`` uses its pure-torch fallback.
* ``SFPO_BUILD_CUDA=1``: require the CUDA kernels (error if impossible); ``0``: CPU kernels only.
  Unset: add CUDA kernels when torch was built with CUDA and nvcc is found.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to build for. Unset: those of the GPUs visible at
  build time, else ``DEFAULT_CUDA_ARCHS`` less what the installed nvcc cannot target; either way
  with PTX for the newest, which the driver compiles for any newer GPU.

The list built for is recorded in the extension (``_C.cuda_archs()``): on a GPU it cannot run on,
``sfpo_megatron.ops`` says so once and uses its pure-torch fallback.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Relative paths: setuptools rejects absolute source paths in some install modes.
CPU_SOURCES = ["csrc/binding.cpp", "csrc/reposition_cpu.cpp"]
CUDA_SOURCES = ["csrc/reposition.cu"]
# No FMA contraction, so results stay bit-identical to torch's separately rounded ops.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
# at::parallel_for (a header) runs in parallel only in code compiled with OpenMP, as torch's Linux
# builds are. Where torch loads libgomp.so.1 itself (its Linux CPU wheels), the extension's
# libgomp.so.1 is that same library: one thread pool, torch.get_num_threads() threads.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
NVCC_FLAGS = ["-O3", "--fmad=false"]
# Built for when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100 (8.0), A10 and RTX 30
# (8.6), L4, L40S and RTX 40 (8.9), H100 and H200 (9.0), B200 (10.0), RTX 50 (12.0); PTX for
# anything newer. nvcc before CUDA 12.8 cannot target 10.0 and 12.0, which are then left out (as is
# their PTX: 9.0's stands in); torch before Blackwell support rejects them: set the list then.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


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


def _nvcc_archs(cuda_home: str) -> set[str] | None:
    """The architectures nvcc can target, as "9.0"-style strings; None if it cannot tell us."""
    try:
        listing = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {f"{int(n[:-1])}.{n[-1]}" for n in re.findall(r"compute_(\d+)", listing)}


def _cuda_arch_list(torch, cuda_home: str) -> str:
    """The TORCH_CUDA_ARCH_LIST to build with (see the module docstring)."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen
    visible = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    if visible:
        archs = [f"{major}.{minor}" for major, minor in sorted(visible)]
        print(f"sfpo-megatron: building the CUDA kernels for the GPUs here: {', '.join(archs)}")
    else:
        archs = DEFAULT_CUDA_ARCHS.removesuffix("+PTX").split(";")
        known = _nvcc_archs(cuda_home)
        if known is not None and any(a in known for a in archs):
            skipped = [a for a in archs if a not in known]
            archs = [a for a in archs if a in known]
            if skipped:
                print(f"sfpo-megatron: nvcc cannot target {', '.join(skipped)}; leaving them out")
    return ";".join(archs) + "+PTX"


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
        # BuildExtension reads the arch list from the environment; the binding reports it.
        archs = _cuda_arch_list(torch, cpp_extension.CUDA_HOME)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cxx_flags = CXX_FLAGS + OPENMP_FLAGS + ["-DSFPO_WITH_CUDA", f'-DSFPO_CUDA_ARCHS="{archs}"']
        ext = cpp_extension.CUDAExtension(
            name="sfpo_megatron._C",
            sources=CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="sfpo_megatron._C",
            sources=CPU_SOURCES,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

# Model Optimizer 0.47 imports requests without declaring it.
FP8 = ["nvidia-modelopt>=0.47,<0.48", "requests>=2,<3"]

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
        # The tests compare the fp8 quantizer with Model Optimizer's reference bit for bit.
        "test": [
            "pytest>=8,<10",
            "ruff>=0.17,<0.18",
            "pyarrow>=14,<27",
            "matplotlib>=3.8,<4",
            "tensorboard>=2.15,<3",
            *FP8,
        ],
        "parquet": ["pyarrow>=14,<27"],
        "plot": ["matplotlib>=3.8,<4"],
        "sglang": ["sglang==0.5.23"],
        "fp8": FP8,
    },
    entry_points={"console_scripts": ["sfpo-megatron = sfpo_megatron.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
