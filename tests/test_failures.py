"""A rank that dies mid-run: the other ranks stop with an error within ``parallel.timeout_s``
(no hang, non-zero exits), and ``checkpoint.resume=auto`` then reaches exactly the state of an
uninterrupted run. Ranks are started as srun starts them (no torchrun agent to clean up)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from test_trainer import DEMO, assert_same_result, overrides

from conftest import REPO, free_ports, srun_env

TIMEOUT_S = 60
LAYOUT = {"parallel.tensor": 2, "parallel.timeout_s": TIMEOUT_S, "eval.interval": 0}


def start_ranks(run, ranks: int = 4, **extra) -> list[subprocess.Popen]:
    port = free_ports()
    args = overrides(run, **LAYOUT, **extra)
    procs = []
    for rank in range(ranks):
        env = srun_env(rank, ranks, port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sfpo_megatron.cli", "train", str(DEMO), *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(timeout=600) for p in procs]


def test_a_dead_rank_stops_the_others_and_resume_is_exact(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert finish(start_ranks(reference)) == [0] * 4

    procs = start_ranks(run)
    second = run / "ckpt" / "iter_0000002"
    deadline = time.monotonic() + 300
    while not second.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[3].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = [p.wait(timeout=TIMEOUT_S + 60) for p in procs[:3]]
    assert time.monotonic() - killed_at < TIMEOUT_S + 30
    assert all(code != 0 for code in codes), codes

    assert finish(start_ranks(run, **{"checkpoint.resume": "auto"})) == [0] * 4
    assert_same_result(run, reference, after=2)
