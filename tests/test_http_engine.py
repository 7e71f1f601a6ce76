"""The embedded engine served over SGLang's HTTP protocol: a trainer under TP2 / PP2 syncs
through /update_weights_from_distributed over gloo (one request and one broadcast per
bucket), generates, trains, syncs again and finds every served tensor equal to its own; the
client refuses bad replies and never hangs on a dead server."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import torch
from sglang_schema import validate_request

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.protocol.flat_bucket import flatten, layout, unflatten
from sfpo_megatron.rollout.launcher import ServerProcess, embedded_command, sglang_command
from sfpo_megatron.rollout.sglang_client import SGLangClient

from conftest import (
    TESTS,
    free_ports,
    save_random_hf_model,
    small_run,
    start_embedded_server,
    torchrun,
)


def start_server(model_dir, tmp_path, load_weights=False):
    """The embedded engine's server; returns its process and a client with short retries."""
    server = start_embedded_server(model_dir, tmp_path / "server.log", load_weights=load_weights)
    client = SGLangClient(server.url, timeout_s=60, retries=2, backoff_s=0.2)
    return server.process, client


@pytest.fixture
def model_dir(tmp_path):
    save_random_hf_model(tmp_path / "m", "qwen3")
    return tmp_path / "m"


@pytest.mark.parametrize("layout_args", [["parallel.tensor=2"], ["parallel.pipeline=2"]])
def test_trainer_syncs_generates_trains_and_syncs_again(model_dir, tmp_path, layout_args):
    proc, client = start_server(model_dir, tmp_path)
    try:
        torchrun(
            2,
            TESTS / "dist" / "sglang_sync_worker.py",
            str(tmp_path / "r.json"),
            client.url,
            str(free_ports()),
            *small_run(model_dir),
            *layout_args,
            timeout=300,
        )
    finally:
        proc.kill()
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["sample_versions"] == [1]
    assert r["model_info"]["weight_version"] == "2"
    assert r["logprob_gap"] < 1e-4
    senders = [rank for rank in r["ranks"] if rank["checked"]]
    assert sum(rank["checked"] for rank in senders) == r["expected_tensors"]
    assert all(not rank["mismatched"] for rank in senders)
    buckets = sum(rank["buckets"] for rank in r["ranks"])
    assert buckets > 2
    assert r["model_info"]["sfpo_update_requests"] == buckets  # one request per bucket


def test_server_killed_mid_batch_is_an_error_not_a_hang(model_dir, tmp_path):
    proc, client = start_server(model_dir, tmp_path, load_weights=True)
    outcome = {}

    def rollout():
        started = time.monotonic()
        try:
            outcome["samples"] = client.generate(
                [[1, 2, 3]] * 64, SamplingParams(n=4, max_new_tokens=400)
            )
        except RolloutError as error:
            outcome["error"] = str(error)
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=rollout)
    worker.start()
    time.sleep(1.0)
    proc.kill()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "samples" not in outcome and "failed after" in outcome["error"]


def test_unknown_sampling_key_is_refused(model_dir, tmp_path):
    proc, client = start_server(model_dir, tmp_path, load_weights=True)
    try:
        with pytest.raises(RolloutError, match="HTTP 400.*unknown field `seed`"):
            client._request(
                "POST", "/generate", {"input_ids": [1, 2], "sampling_params": {"seed": 1}}
            )
        samples = client.generate([[1, 2], [3]], SamplingParams(n=2, max_new_tokens=3, seed=0))
        assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
        assert all(s.weight_version == 0 and len(s.output_ids) <= 3 for s in samples)
    finally:
        proc.kill()


def test_flattened_bucket_layout():
    bucket = [
        ("a", torch.ones(3, dtype=torch.bfloat16)),
        ("b", torch.arange(5.0)),
        ("c", torch.arange(2, dtype=torch.int64)),
        ("d", torch.ones(1, dtype=torch.uint8)),
    ]
    flat = flatten(bucket)
    assert flat.names == ["c", "b", "a", "d"]  # descending element size: aligned, unpadded
    assert flat.dtypes == ["int64", "float32", "bfloat16", "uint8"]
    assert flat.buffer.numel() == 16 + 20 + 6 + 1
    for name, tensor in unflatten(flat.buffer, flat.names, flat.dtypes, flat.shapes):
        assert torch.equal(tensor, dict(bucket)[name])
    with pytest.raises(ValueError, match="unaligned tensor: offset 6"):
        layout(["bfloat16", "float32"], [[3], [1]])
    with pytest.raises(ValueError, match="unknown dtype name 'torch.bfloat16'"):
        layout(["torch.bfloat16"], [[1]])


# ---------------------------------------------------------------- launching servers


def test_launcher_starts_serves_and_stops(model_dir, tmp_path):
    port = free_ports()
    server = ServerProcess(
        embedded_command(str(model_dir), port, load_weights=True),
        f"http://127.0.0.1:{port}",
        tmp_path / "server.log",
        60,
        request_timeout_s=60,
    )
    client = server.start()
    try:
        for payload in ({"tags": None}, {"tags": ["weights"]}):
            validate_request("/release_memory_occupation", payload)
        client.release_memory_occupation()
        client.resume_memory_occupation(["weights"])
        samples = client.generate([[4, 5]], SamplingParams(max_new_tokens=2, seed=1))
        assert len(samples) == 1 and samples[0].weight_version == 0
    finally:
        server.stop()
    assert not server.alive()


def test_launcher_reports_a_server_that_dies(tmp_path):
    port = free_ports()
    server = ServerProcess(
        embedded_command(str(tmp_path / "nowhere"), port),
        f"http://127.0.0.1:{port}",
        tmp_path / "server.log",
        60,
        request_timeout_s=60,
    )
    with pytest.raises(RolloutError, match=r"exited with 1 while starting(.|\n)*nowhere"):
        server.start()


def test_launcher_gives_up_on_a_silent_server(tmp_path):
    port = free_ports()
    server = ServerProcess(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        f"http://127.0.0.1:{port}",
        tmp_path / "server.log",
        2,
        request_timeout_s=2,
    )
    with pytest.raises(RolloutError, match="not healthy within 2"):
        server.start()
    assert not server.alive()


def test_sglang_command():
    command = sglang_command("/models/q", 30001, tp=2, memory_saver=True)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    assert command[command.index("--tp-size") + 1] == "2"
    assert "--skip-tokenizer-init" in command and "--enable-memory-saver" in command
