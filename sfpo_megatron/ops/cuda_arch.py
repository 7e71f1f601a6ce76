"""Whether CUDA kernels built for a TORCH_CUDA_ARCH_LIST can run on a GPU of a given capability.

setup.py records the list it built with in the extension (``_C.cuda_archs()``), so that the ops
can fall back to torch on a GPU the kernels cannot run on instead of failing at the first launch.
CUDA's rules, per entry: machine code for X.Y runs on capability X.Z with Z >= Y; arch-specific
code (X.Ya) on X.Y alone; "+PTX" adds PTX, which the driver compiles for any capability >= X.Y.
Named entries ("Hopper") are not interpreted: a list holding one is trusted.
"""

import re

_ENTRY = re.compile(r"(\d+)\.(\d+)(a?)(\+PTX)?")


def _runs(entry: re.Match, capability: tuple[int, int]) -> bool:
    arch = (int(entry[1]), int(entry[2]))
    if entry[3]:  # arch-specific features: that exact GPU only, PTX included
        return capability == arch
    if entry[4] and capability >= arch:
        return True
    return capability[0] == arch[0] and capability[1] >= arch[1]


def unsupported_reason(arch_list: str, capability: tuple[int, int]) -> str | None:
    """Why kernels built for arch_list cannot run on capability; None if they can (or if unsure)."""
    entries = [e for e in re.split(r"[;,\s]+", arch_list.strip()) if e]
    matches = [_ENTRY.fullmatch(e) for e in entries]
    if not entries or None in matches:
        return None
    if any(_runs(m, capability) for m in matches):
        return None
    return (
        f"sfpo_megatron._C was built for CUDA architectures {arch_list!r}, which cannot run on "
        f"this GPU (compute capability {capability[0]}.{capability[1]})"
    )
