"""The Megatron-on-CPU patches are opt-in, refuse to run where CUDA is available, and are
given back by disable()."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, write_hf_config

IMPORT_EVERYTHING = """
import torch
original = (torch.cuda.current_device, torch.Tensor.type, torch.cuda.synchronize)
import sfpo_megatron, sfpo_megatron.policy.actor, sfpo_megatron.training.loop, sfpo_megatron.cli
from sfpo_megatron.launch import cpu_compat
assert not cpu_compat.enabled()
assert (torch.cuda.current_device, torch.Tensor.type, torch.cuda.synchronize) == original
assert torch.zeros(1).type() == "torch.FloatTensor"
print("untouched")
"""

REFUSED_WITH_CUDA = """
import torch
torch.cuda.is_available = lambda: True
original = torch.Tensor.type
from sfpo_megatron.launch import cpu_compat
try:
    cpu_compat.enable()
except RuntimeError as error:
    assert "CUDA is available" in str(error)
    assert torch.Tensor.type is original and not cpu_compat.enabled()
    print("refused")
"""

ENABLED = """
import torch
from sfpo_megatron.launch import cpu_compat
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

PATCHED = (
    "(torch.cuda, 'current_device'), (torch.cuda, 'synchronize'), (torch.Tensor, 'cuda'), "
    "(torch.Tensor, 'type'), (torch.cuda, 'get_rng_state'), (torch.cuda, 'set_rng_state'), "
    "(torch.cuda, 'manual_seed'), (mp_random, '_get_cuda_rng_state'), "
    "(mp_random, '_set_cuda_rng_state')"
)

DISABLED = f"""
import torch
from megatron.core.tensor_parallel import random as mp_random
from sfpo_megatron.launch import cpu_compat
patched = [{PATCHED}]
before = [getattr(owner, name) for owner, name in patched]
own = [name in vars(owner) for owner, name in patched]
modes = torch._C._len_torch_function_stack()
cpu_compat.enable()
cpu_compat.enable()
assert cpu_compat.enabled()
assert torch._C._len_torch_function_stack() == modes + 1
assert all(getattr(owner, name) is not b for (owner, name), b in zip(patched, before))
cpu_compat.disable()
assert not cpu_compat.enabled()
assert torch._C._len_torch_function_stack() == modes
assert all(getattr(owner, name) is b for (owner, name), b in zip(patched, before))
assert [name in vars(owner) for owner, name in patched] == own
assert torch.zeros(1).type() == "torch.FloatTensor"
try:
    torch.zeros(1, device="cuda")
except (AssertionError, RuntimeError):
    pass
else:
    raise AssertionError("a CUDA factory still lands on the CPU after disable()")
cpu_compat.disable()
cpu_compat.enable()
assert torch.zeros(1, device="cuda").device.type == "cpu"
print("restored")
"""

SHUTDOWN = """
import sys
import torch
from sfpo_megatron.launch import cpu_compat
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import LaunchEnv, free_port, init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
original = torch.Tensor.type
cfg = load_config(None, [f"model.hf_config={sys.argv[1]}"])
arch = read_hf_config(cfg.model.hf_config)
init_distributed(cfg, arch, LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
assert cpu_compat.enabled() and torch.Tensor.type is not original
shutdown()
assert not cpu_compat.enabled() and torch.Tensor.type is original
print("given back")
"""


def run(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_importing_the_package_patches_nothing():
    assert run(IMPORT_EVERYTHING) == "untouched"


def test_refuses_when_cuda_is_available():
    assert run(REFUSED_WITH_CUDA) == "refused"


def test_enable_maps_cuda_calls_to_cpu():
    assert run(ENABLED) == "patched"


def test_disable_gives_back_every_patch():
    assert run(DISABLED) == "restored"


def test_shutdown_gives_back_the_patches_init_distributed_applied(tmp_path):
    model = write_hf_config(tmp_path / "model", "qwen2")
    assert run(SHUTDOWN, str(model)) == "given back"
