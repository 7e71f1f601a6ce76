"""Shared test helpers: tiny HF model configs and torchrun launches."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

TINY = {
    "qwen2": dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=50000.0,
    ),
}


def write_hf_config(directory: Path, model_type: str, **overrides) -> Path:
    """Save a tiny transformers config of one family (no weights) and return its directory."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[model_type]
    directory.mkdir(parents=True, exist_ok=True)
    cls(**{**TINY[model_type], **overrides}).save_pretrained(directory)
    return directory


def save_random_hf_model(directory, family, save_max_shard_size="5GB", std=0.1, **overrides):
    """A transformers model with every weight random (norms near 1, the rest N(0, std)),
    saved as safetensors (sharded with an index when larger than ``save_max_shard_size``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{**TINY[family], **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, std)
    model.save_pretrained(directory, max_shard_size=save_max_shard_size)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return model


_HANDED_OUT: set[int] = set()


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free now and not handed out before in this
    process, picked below the kernel's ephemeral range: a port from that range can be taken by
    any connecting socket (gloo's, torchrun's) between this check and the job's bind."""
    while True:
        ports = range(base := random.randrange(30100, 32700 - count), base + count)
        if _HANDED_OUT.intersection(ports):
            continue
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.update(ports)
        return base


def small_run(model_dir: Path, micro_batch_size: int = 2) -> list[str]:
    """Overrides of a small fp32 run of ``model_dir`` sampling at temperature 0.8: 4 prompts x
    2 samples, one mini-batch."""
    return [
        f"model.hf_config={model_dir}",
        "model.dtype=fp32",
        "rollout.temperature=0.8",
        "train.prompts_per_step=4",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=4",
        f"train.micro_batch_size={micro_batch_size}",
    ]


def torchrun(
    nproc: int, script: Path, *args: str, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` CPU ranks; raise with the output tail if it fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_ports()),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun {script.name} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def cli_logging():
    """Logging as the CLI sets it up (stdout for INFO, stderr for warnings, rank 0 only),
    undone after the test."""
    from sfpo_megatron.common.log import PACKAGE, configure

    root, package = logging.getLogger(), logging.getLogger(PACKAGE)
    saved = root.handlers[:], root.level, package.level
    configure()
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    package.setLevel(saved[2])


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    """Megatron results of every layout in tests/layouts.py beside their references."""
    from layouts import run_all

    return run_all(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The 5-iteration run of test_trainer.overrides under DP2 that resumed runs (of
    test_trainer and test_stop_request) must reproduce."""
    from test_trainer import train

    run = tmp_path_factory.mktemp("uninterrupted")
    train(run)
    return run


def start_embedded_server(model_dir, log_path, *extra_args: str, load_weights: bool = False):
    """The embedded engine's HTTP server on a free port, started and healthy. A port another
    process takes between choosing and binding it is retried on a new one."""
    from sfpo_megatron.common.errors import RolloutError
    from sfpo_megatron.rollout.launcher import ServerProcess, embedded_command

    for attempt in range(3):
        port = free_ports()
        command = embedded_command(str(model_dir), port, load_weights=load_weights)
        url = f"http://127.0.0.1:{port}"
        server = ServerProcess([*command, *extra_args], url, log_path, 60, request_timeout_s=60)
        try:
            server.start()
            return server
        except RolloutError as error:
            if "Address already in use" not in str(error) or attempt == 2:
                raise


def srun_env(rank: int, ranks: int, port: int) -> dict[str, str]:
    """The environment srun gives task ``rank`` of ``ranks`` on this host (no torchrun)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(ranks),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODELIST": "localhost",
        "MASTER_PORT": str(port),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    return env


_CHECKOUT_KEY = pytest.StashKey[set[str] | None]()


def _checkout_files() -> set[str] | None:
    """Untracked and ignored files of the checkout (bytecode caches and the built extension
    aside); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if "__pycache__/" not in p and not p.endswith((".so", ".pyc"))}


def pytest_sessionstart(session):
    session.config.stash[_CHECKOUT_KEY] = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """The suite must write nothing into the source tree: new files there fail the run."""
    before = session.config.stash.get(_CHECKOUT_KEY, None)
    after = _checkout_files()
    if before is None or after is None:
        return
    written = sorted(after - before)
    if written:
        print(f"\nthe test suite wrote into the checkout {REPO}: {', '.join(written)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
