"""One step off-policy (``train.off_policy_steps: 1``) against a rollout server process: the
next batch is sampled while the actor trains, every sample is one weight version behind the
policy it trains (none on the first iteration), a run resumed from a checkpoint taken with a
batch sampled ahead is bit-exact, and a server that dies during an overlapped rollout fails
the run on every rank with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from test_trainer import MODEL, assert_same_result, stable_metrics, train

from conftest import free_ports, start_embedded_server

ITERATIONS = 5
KILLER = '''
import os
import signal
from pathlib import Path


def no_signal_killing_the_server(response, answer, source):
    """Always 0 (no group is informative: dynamic sampling runs all its rounds); its 18th
    call (the start-up probe, iteration 1's 2 rounds of 8, then the first sample of the
    batch sampled ahead) kills the server, so that batch's second round cannot be sampled."""
    mark = Path(os.environ["KILL_MARK"])
    count = int(mark.read_text()) if mark.exists() else 0
    mark.write_text(str(count + 1))
    if count == 17:
        os.kill(int(os.environ["SERVER_PID"]), signal.SIGKILL)
    return 0.0
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_embedded_server(MODEL, tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()


def off_policy(server, **extra) -> dict:
    return {
        "train.off_policy_steps": 1,
        "rollout.engine": "servers",
        "rollout.server_urls": f"[{server.url}]",
        "rollout.sync_address": "127.0.0.1",
        "rollout.sync_port": free_ports(),
        "eval.interval": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def off_policy_run(server, tmp_path_factory):
    run = tmp_path_factory.mktemp("off_policy")
    train(run, **off_policy(server))
    return run


def test_samples_are_one_version_behind(off_policy_run):
    metrics = stable_metrics(off_policy_run)
    assert sorted(metrics) == list(range(1, ITERATIONS + 1))
    # theta0 of iteration i is version i - 1; its samples were drawn with version i - 2
    versions = [metrics[i]["rollout_weight_version"] for i in metrics]
    assert versions == [0, 0, 1, 2, 3]
    assert [metrics[i]["rollout_staleness"] for i in metrics] == [0, 1, 1, 1, 1]
    assert all(metrics[i]["weight_version"] == i for i in metrics)
    # the gap to the policy the samples came from is real now (and measured)
    assert metrics[1]["rollout_logprob_gap"] < 1e-4 < metrics[3]["rollout_logprob_gap"]
    rows = [json.loads(line) for line in (off_policy_run / "log/metrics.jsonl").open()]
    waits = [row.get("time_rollout_wait") for row in rows]
    assert waits[0] is None and all(w >= 0 for w in waits[1:])  # iteration 1 sampled at once


def test_resume_with_a_batch_sampled_ahead_is_exact(off_policy_run, server, tmp_path):
    stopped_after = 2
    name = f"iter_{stopped_after:07d}"
    assert (off_policy_run / "ckpt" / name / "next_batch.pt").is_file()
    (tmp_path / "ckpt").mkdir()
    shutil.copytree(off_policy_run / "ckpt" / name, tmp_path / "ckpt" / name)
    shutil.copytree(off_policy_run / "log", tmp_path / "log")
    train(tmp_path, **off_policy(server, **{"checkpoint.resume": "auto"}))
    assert_same_result(tmp_path, off_policy_run, stopped_after)


def test_a_server_that_dies_mid_rollout_fails_the_run(tmp_path, monkeypatch):
    """The server dies while the next batch is sampled ahead (the server belongs to this
    test, so nobody restarts it): every rank ends with the error, none waits forever."""
    (tmp_path / "killer.py").write_text(KILLER)
    server = start_embedded_server(MODEL, tmp_path / "server.log")
    monkeypatch.setenv("KILL_MARK", str(tmp_path / "mark"))
    monkeypatch.setenv("SERVER_PID", str(server.process.pid))
    try:
        result = train(
            tmp_path,
            check=False,
            **off_policy(
                server,
                **{
                    "train.iterations": 3,
                    "train.prompts_per_step": 2,
                    "train.mini_batch_prompts": 1,
                    "train.max_sampling_rounds": 2,
                    "train.warm_start_steps": 0,
                    "checkpoint.dir": "null",
                    "checkpoint.interval": 0,
                    "eval.interval": 0,
                    "reward.fn": f"{tmp_path / 'killer.py'}:no_signal_killing_the_server",
                },
            ),
        )
    finally:
        server.stop()
    assert result.returncode != 0
    assert int((tmp_path / "mark").read_text()) == 25  # the round in scoring ends, no more
    assert "RolloutError" in result.stderr and server.url in result.stderr, result.stderr[-3000:]
    assert "[rank1]" in result.stderr  # rank 1 raised it too: nobody waits for rank 0
    # iteration 1 trained, then waited for the batch sampled ahead: the failure ends it
    assert not (tmp_path / "log/metrics.jsonl").read_text()
