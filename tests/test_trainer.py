"""The RL loop end to end on the demo task's tokenizer: exact resume (SFPO before and after the
entropy switch, the warm-started KL reference included), a job killed while writing a
checkpoint, the warm start under an LR warm-up, and bad data / reward functions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_ports, start_embedded_server

MODEL = REPO / "examples/models/tiny-digits"
TASK = REPO / "examples/tasks/digits"
DEMO = REPO / "examples/configs/demo.yaml"
VOLATILE = ("time_", "seconds", "tokens_per_s")


def overrides(run: Path, **extra) -> list[str]:
    """A 5-iteration SFPO run whose entropy switch fires at iteration 2 (window 2, two-sided:
    |z| is exactly 1 there), evaluated every 2 iterations and checkpointed every iteration;
    its KL reference is the warm-started policy, which only its checkpoints hold."""
    settings = {
        "model.hf_config": str(MODEL),
        "model.load_weights": "false",
        "model.dtype": "fp32",
        "train.iterations": 5,
        "train.prompts_per_step": 4,
        "train.samples_per_prompt": 4,
        "train.mini_batch_prompts": 2,
        "train.micro_batch_size": 4,
        "train.dynamic_sampling": "true",
        "train.warm_start_steps": 2,
        "optimizer.lr": 1e-3,
        "algorithm.name": "sfpo",
        "algorithm.sfpo.window": 2,
        "algorithm.sfpo.tau": 0.5,
        "algorithm.sfpo.one_sided": "false",
        "algorithm.kl_coef": 0.05,
        "rollout.max_response_length": 4,
        "data.train_files": str(TASK / "problems.jsonl"),
        "data.use_chat_template": "false",
        "data.max_prompt_length": 16,
        "reward.fn": f"{TASK / 'reward.py'}:exact_match",
        "reward.workers": 0,
        "eval.files": str(TASK / "problems.jsonl"),
        "eval.interval": 2,
        "eval.k": 2,
        "logging.output_dir": str(run / "log"),
        "checkpoint.dir": str(run / "ckpt"),
        "checkpoint.interval": 1,
        "checkpoint.export_hf_dir": str(run / "hf"),
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def command(ranks: int, args: list[str]) -> list[str]:
    cli = ["-m", "sfpo_megatron.cli", "train", str(DEMO), *args]
    if ranks == 1:
        return [sys.executable, *cli]
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    return [sys.executable, *launch, "--master_port", str(free_ports()), *cli]


def train(run: Path, ranks: int = 2, check: bool = True, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command(ranks, overrides(run, **extra)),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def stable_metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "log/metrics.jsonl").read_text().splitlines()]
    return {
        row["iteration"]: {k: v for k, v in row.items() if not k.startswith(VOLATILE)}
        for row in rows
    }


def assert_same_result(run: Path, reference: Path, after: int) -> None:
    ours, theirs = stable_metrics(run), stable_metrics(reference)
    for iteration in range(after + 1, 6):
        assert ours[iteration] == theirs[iteration], iteration
    a, b = load_file(run / "hf/model.safetensors"), load_file(reference / "hf/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state = json.loads((run / "ckpt/iter_0000005/trainer_state.json").read_text())
    expected = json.loads((reference / "ckpt/iter_0000005/trainer_state.json").read_text())
    assert state == expected


def test_uninterrupted_run_switches_and_logs(uninterrupted):
    metrics = stable_metrics(uninterrupted)
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    assert [metrics[i]["sfpo_active"] for i in range(1, 6)] == [1, 1, 0, 0, 0]
    assert [metrics[i]["switched"] for i in range(1, 6)] == [0, 1, 1, 1, 1]
    assert all(metrics[i]["weight_version"] == i for i in metrics)
    assert all(abs(metrics[i]["rollout_logprob_gap"]) < 1e-4 for i in metrics)
    assert all(metrics[i]["ref_kl"] > 0 for i in metrics)
    # 4 prompts x 4 samples per sampling round, extra dynamic-sampling rounds included
    rounds = [int(metrics[i]["sampling_rounds"]) for i in range(1, 6)]
    assert max(rounds) > 1
    assert [metrics[i]["rollouts"] for i in range(1, 6)] == [
        16 * sum(rounds[:i]) for i in range(1, 6)
    ]
    assert {"eval/macro", "eval/add", "eval/sub"} <= metrics[2].keys()
    assert "eval/macro" in metrics[4] and "eval/macro" in metrics[5]
    best = json.loads((uninterrupted / "log/best.json").read_text())
    assert best["iteration"] in (2, 4, 5)


@pytest.mark.parametrize("stopped_after", [1, 3], ids=["before-switch", "after-switch"])
def test_resume_is_exact(uninterrupted, tmp_path, stopped_after):
    (tmp_path / "ckpt").mkdir()
    name = f"iter_{stopped_after:07d}"
    shutil.copytree(uninterrupted / "ckpt" / name, tmp_path / "ckpt" / name)
    shutil.copytree(uninterrupted / "log", tmp_path / "log")
    train(tmp_path, **{"checkpoint.resume": "auto"})
    assert_same_result(tmp_path, uninterrupted, stopped_after)


def test_killed_while_checkpointing_resumes_from_the_previous_one(uninterrupted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        command(2, overrides(tmp_path)),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = tmp_path / "ckpt"
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("iter_0000003.partial")) and time.monotonic() < deadline:
        assert job.poll() is None, "the run ended before its third checkpoint"
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert (ckpt / "iter_0000003.partial").exists() and not (ckpt / "iter_0000003").exists()
    train(tmp_path, **{"checkpoint.resume": "auto"})
    assert_same_result(tmp_path, uninterrupted, 2)


def test_warm_start_trains_under_an_lr_warm_up_and_becomes_the_kl_reference(tmp_path):
    """With an RL warm-up (whose first LR is 0) the warm start still trains, at its own LR;
    the first RL iteration then runs at the schedule's first LR, as without a warm start, and
    its single optimizer step starts at the KL reference: the warm-started policy."""
    result = train(
        tmp_path,
        ranks=1,
        **{
            "algorithm.name": "grpo",
            "algorithm.kl_coef": 0.1,
            "optimizer.warmup_steps": 2,
            "train.warm_start_steps": 10,
            "train.warm_start_lr": 1e-2,
            "train.iterations": 1,
            "train.prompts_per_step": 2,
            "train.mini_batch_prompts": 2,
            "train.dynamic_sampling": "false",
            "eval.interval": 0,
            "checkpoint.dir": "null",
            "checkpoint.interval": 0,
            "checkpoint.export_hf_dir": "null",
        },
    )
    nll = [float(line.split()[5]) for line in result.stdout.splitlines() if "answer nll" in line]
    assert len(nll) == 10 and nll[-1] < nll[0] - 0.5, nll
    metrics = stable_metrics(tmp_path)[1]
    assert metrics["lr"] == 0.0  # the warm-up's first LR: the schedule was not touched
    assert metrics["approx_kl"] == 0.0  # one optimizer step: the pass is at the rollout policy
    assert metrics["ref_kl"] == 0.0  # ... which is the reference


def test_rollouts_from_a_server_process_under_tp2(tmp_path):
    """Disaggregated rollout: the trainer (TP2) samples from a server over HTTP and pushes its
    weights over a gloo broadcast group after every update; rollout log-probs equal the
    actor's, so the server samples from exactly the trainer's weights at every iteration."""
    server = start_embedded_server(MODEL, tmp_path / "server.log")
    port = server.url.rsplit(":", 1)[1]
    try:
        train(
            tmp_path,
            **{
                "parallel.tensor": 2,
                "train.iterations": 2,
                "checkpoint.dir": "null",
                "checkpoint.interval": 0,
                "eval.interval": 0,
                "rollout.engine": "servers",
                "rollout.server_urls": f"[http://127.0.0.1:{port}]",
                "rollout.sync_address": "127.0.0.1",
                "rollout.sync_port": free_ports(),
            },
        )
    finally:
        server.stop()
    metrics = stable_metrics(tmp_path)
    assert [metrics[i]["weight_version"] for i in (1, 2)] == [1, 2]
    assert all(metrics[i]["rollout_logprob_gap"] < 1e-4 for i in (1, 2))


KILLER = '''
import os
from pathlib import Path

import psutil


def exact_match_killing_the_server_once(response, answer, source):
    """Exact match; its 10th call (iteration 2's first sample, after the start-up probe and
    iteration 1's 8) kills the rollout server this process runs."""
    mark = Path(os.environ["KILL_MARK"])
    count = int(mark.read_text()) if mark.exists() else 0
    mark.write_text(str(count + 1))
    if count == 9:
        for child in psutil.Process().children(recursive=True):
            if "sfpo_megatron.rollout.http_server" in " ".join(child.cmdline()):
                child.kill()
    return float(response.strip() == answer)
'''


def test_colocated_server_that_dies_is_restarted_and_resynced(tmp_path, monkeypatch):
    """Colocated rollout under TP2 (one engine over both ranks' devices, weights through
    shared-memory handles, memory released while training): the server is killed in
    iteration 2; it is restarted, gets the current weights, and the run completes with
    rollouts that match the actor's weights every iteration."""
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.setenv("KILL_MARK", str(tmp_path / "mark"))
    result = train(
        tmp_path,
        **{
            "parallel.tensor": 2,
            "train.iterations": 3,
            "train.prompts_per_step": 2,
            "train.mini_batch_prompts": 1,
            "train.micro_batch_size": 2,
            "train.dynamic_sampling": "false",
            "checkpoint.dir": "null",
            "checkpoint.interval": 0,
            "eval.interval": 0,
            "reward.fn": f"{tmp_path / 'killer.py'}:exact_match_killing_the_server_once",
            "rollout.engine": "colocated",
            "rollout.server": "embedded",
            "rollout.server_tp": 2,
            "rollout.sync_address": "127.0.0.1",
        },
    )
    assert "a rollout server died and was restarted" in result.stderr
    assert "rank 0: its rollout server http://127.0.0.1:" in result.stderr
    metrics = stable_metrics(tmp_path)
    assert [metrics[i]["weight_version"] for i in (1, 2, 3)] == [1, 2, 3]
    assert all(metrics[i]["rollout_logprob_gap"] < 1e-4 for i in (1, 2, 3))
    assert int((tmp_path / "mark").read_text()) == 1 + 24  # the probe, 3 x 2 prompts x 4 samples
