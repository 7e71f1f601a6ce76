"""The Megatron-on-CPU patches are opt-in and refuse to run where CUDA is available."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

IMPORT_EVERYTHING = """
import torch
original = (torch.cuda.current_device, torch.Tensor.type, torch.cuda.synchronize)
import sfpo_megatron, sfpo_megatron.actor, sfpo_megatron.trainer, sfpo_megatron.cli
from sfpo_megatron import cpu_compat
assert not cpu_compat.enabled()
assert (torch.cuda.current_device, torch.Tensor.type, torch.cuda.synchronize) == original
assert torch.zeros(1).type() == "torch.FloatTensor"
print("untouched")
"""

REFUSED_WITH_CUDA = """
import torch
torch.cuda.is_available = lambda: True
original = torch.Tensor.type
from sfpo_megatron import cpu_compat
try:
    cpu_compat.enable()
except RuntimeError as error:
    assert "CUDA is available" in str(error)
    assert torch.Tensor.type is original and not cpu_compat.enabled()
    print("refused")
"""

ENABLED = """
import torch
from sfpo_megatron import cpu_compat
cpu_compat.enable()
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
assert torch.zeros(1).cuda().device.type == "cpu"
state = torch.cuda.get_rng_state()
a = torch.rand(3)
torch.cuda.set_rng_state(state)
assert torch.equal(a, torch.rand(3))
print("patched")
"""


def run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_importing_the_package_patches_nothing():
    assert run(IMPORT_EVERYTHING) == "untouched"


def test_refuses_when_cuda_is_available():
    assert run(REFUSED_WITH_CUDA) == "refused"


def test_enable_maps_cuda_calls_to_cpu():
    assert run(ENABLED) == "patched"
