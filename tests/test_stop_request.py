"""Stopping early on request: a stop file or a signal makes every rank finish the current
iteration, save its checkpoint and exit with ``EXIT_STATUS``; resuming from it reaches exactly
the state of an uninterrupted run. Ranks are started as srun starts them, so that each rank's
exit status is seen (torchrun reports any non-zero one as its own failure)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_trainer import DEMO, assert_same_result, overrides

from sfpo_megatron.config import load_config
from sfpo_megatron.training.metrics import read_metrics
from sfpo_megatron.training.stop_request import EXIT_STATUS, StopRequest, StopRequested
from sfpo_megatron.training.train_checkpoint import checkpoint_dir, require_complete

from conftest import REPO, free_ports, srun_env

LONG = {"train.iterations": 1000, "checkpoint.interval": 0}
"""A run that only stops on request: its one checkpoint is the one the stop writes."""
STOP_WITHIN_S = 60


def start_ranks(run: Path, ranks: int = 2, **extra) -> list[subprocess.Popen]:
    """``ranks`` trainer processes on the test task; rank 0's output in ``run/rank0.out``."""
    port, args = free_ports(), overrides(run, **extra)
    procs = []
    for rank in range(ranks):
        with open(run / f"rank{rank}.out", "w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sfpo_megatron.cli", "train", str(DEMO), *args],
                    env=srun_env(rank, ranks, port),
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def last_logged(run: Path) -> int:
    """The last iteration in the run's metrics.jsonl; 0 before the first."""
    metrics = run / "log/metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    return records[-1]["iteration"] if records else 0


def wait_for_iteration(run: Path, procs: list[subprocess.Popen], iteration: int) -> None:
    """Until ``iteration`` is logged (the ranks still running)."""
    deadline = time.monotonic() + 300
    while last_logged(run) < iteration:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)


def stop_codes(procs: list[subprocess.Popen]) -> list[int]:
    """Exit statuses of ``procs``, asked to stop just now: they must end within the bound."""
    asked = time.monotonic()
    codes = [p.wait(timeout=STOP_WITHIN_S) for p in procs]
    assert time.monotonic() - asked < STOP_WITHIN_S
    return codes


def stopped_at(run: Path) -> int:
    """The last iteration logged; asserts that its checkpoint is the only one, complete."""
    last = last_logged(run)
    assert sorted(p.name for p in (run / "ckpt").glob("iter_*")) == [f"iter_{last:07d}"]
    assert require_complete(checkpoint_dir(run / "ckpt", last))["iteration"] == last
    return last


def test_stop_file_checkpoints_the_iteration_and_resume_is_exact(uninterrupted, tmp_path):
    """The stop file appears once iteration 1 is logged; the run stops after the iteration it
    is in and resumes from there to the uninterrupted run's end, bit for bit."""
    run = tmp_path
    procs = start_ranks(run, **LONG)
    wait_for_iteration(run, procs, 1)
    stop_file = run / "ckpt/STOP"
    stop_file.touch()
    assert stop_codes(procs) == [EXIT_STATUS] * 2
    k = stopped_at(run)
    assert 1 <= k < 5 and not stop_file.exists()
    assert (
        f"stopped on request after iteration {k} of 1000: checkpoint "
        f"{checkpoint_dir(run / 'ckpt', k)} is complete; continue with checkpoint.resume=auto"
    ) in (run / "rank0.out").read_text()

    resumed = start_ranks(run, **{"checkpoint.interval": 0, "checkpoint.resume": "auto"})
    assert [p.wait(timeout=600) for p in resumed] == [0, 0]
    assert_same_result(run, uninterrupted, after=k)


def test_usr1_to_one_rank_stops_all_after_an_async_checkpoint(tmp_path):
    """Only rank 1 is signalled: the all-reduce carries its request to rank 0."""
    procs = start_ranks(tmp_path, **LONG, **{"checkpoint.async_save": "true"})
    wait_for_iteration(tmp_path, procs, 1)
    procs[1].send_signal(signal.SIGUSR1)
    assert stop_codes(procs) == [EXIT_STATUS] * 2
    k = stopped_at(tmp_path)
    assert f"stopped on request after iteration {k} of 1000" in (tmp_path / "rank0.out").read_text()


@pytest.fixture
def one_rank_world():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_ports()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def request(*overrides: str) -> StopRequest:
    return StopRequest(load_config(DEMO, list(overrides)).checkpoint, torch.device("cpu"))


def test_configured_signal_sets_the_flag_and_handlers_are_given_back(one_rank_world, tmp_path):
    def previous(number, frame):
        raise AssertionError("the run's handler should have been called")

    signal.signal(signal.SIGUSR2, previous)
    try:
        stop = request(f"checkpoint.dir={tmp_path}", "checkpoint.stop_signals=[USR2]")
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agreed()
        stop.close()
        assert signal.getsignal(signal.SIGUSR2) is previous
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_stop_file_is_acted_on_then_removed(one_rank_world, tmp_path, capsys, cli_logging):
    stop = request(f"checkpoint.dir={tmp_path / 'ckpt'}")
    try:
        (tmp_path / "ckpt/STOP").touch()  # checkpoint.dir exists before the first checkpoint
        assert stop.agreed()
        with pytest.raises(StopRequested):
            stop.end_run(3, 10, tmp_path / "ckpt/iter_0000003")
        assert not (tmp_path / "ckpt/STOP").exists() and not stop.agreed()
    finally:
        stop.close()
    assert capsys.readouterr().out == (
        f"stopped on request after iteration 3 of 10: checkpoint {tmp_path}/ckpt/iter_0000003 "
        f"is complete; continue with checkpoint.resume=auto (exit status {EXIT_STATUS})\n"
    )


def test_without_checkpoint_dir_no_file_and_nothing_saved(one_rank_world, capsys, cli_logging):
    stop = request()
    try:
        assert stop.path is None and not stop.agreed()
        with pytest.raises(StopRequested):
            stop.end_run(3, 10, None)
    finally:
        stop.close()
    assert "iteration 3 of 10: nothing was saved (no checkpoint.dir)" in capsys.readouterr().out
