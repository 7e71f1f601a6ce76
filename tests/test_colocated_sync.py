"""Colocated weight sync over /update_weights_from_tensor: the entry format (handles, not
bytes; readable by an unrelated process and by sglang 0.5.23's allow-listed unpickler), the
embedded server's checks, and trainers under TP2, DP2 and PP2 syncing real server processes
through shared memory (the CPU twin of CUDA-IPC)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from sfpo_megatron.protocol.flat_bucket import flatten
from sfpo_megatron.protocol.ipc import decode_bucket, encode_bucket
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.http_server import EngineServer, RequestError
from sfpo_megatron.rollout.launcher import ServerProcess

from conftest import (
    REPO,
    TESTS,
    save_random_hf_model,
    small_run,
    start_embedded_server,
    torchrun,
    write_hf_config,
)

SGLANG_ALLOWED = {
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("types", "SimpleNamespace"),
}
"""Entries of sglang 0.5.23's ``SafeUnpickler.ALLOWED_GLOBALS`` (srt/utils/common.py) an
entry may use, besides torch dtypes (all listed there); anything else sglang refuses."""


def mixed_bucket() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("a", torch.randn(3, 4)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.randn(7).bfloat16()),
        ("d", torch.ones(2, 2, dtype=torch.uint8)),
    ]


class Recorder(pickle.Unpickler):
    def find_class(self, module, name):
        self.used = [*getattr(self, "used", []), (module, name)]
        return super().find_class(module, name)


def test_entry_carries_handles_sglang_may_unpickle():
    flat = flatten(mixed_bucket())
    strategy = torch.multiprocessing.get_sharing_strategy()
    entry = encode_bucket(flat)
    assert torch.multiprocessing.get_sharing_strategy() == strategy  # left as it was
    recorder = Recorder(io.BytesIO(base64.b64decode(entry)))
    payload = recorder.load()
    used = set(recorder.used)
    dtypes = {u for u in used if u[0] == "torch" and isinstance(getattr(torch, u[1]), torch.dtype)}
    assert used - dtypes <= SGLANG_ALLOWED
    assert ("torch.multiprocessing.reductions", "rebuild_storage_filename") in used
    assert set(payload) == {"flattened_tensor", "metadata"}
    meta = payload["metadata"]
    assert [m.name for m in meta] == flat.names == ["b", "a", "c", "d"]
    assert [(m.start_idx, m.end_idx, m.numel) for m in meta][1] == (40, 88, 48)
    assert meta[2].dtype == torch.bfloat16 and meta[1].shape == torch.Size([3, 4])
    decoded = dict(decode_bucket(encode_bucket(flat)))
    for name, tensor in mixed_bucket():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor)
    big = flatten([("w", torch.zeros(1 << 20))])  # 4 MiB of data, a few hundred bytes of entry
    assert len(encode_bucket(big)) < 2000


def test_an_unrelated_process_reads_the_entry(tmp_path):
    """Not a child: torch's default file-descriptor sharing would fail its authkey check."""
    flat = flatten(mixed_bucket())
    (tmp_path / "entry").write_text(encode_bucket(flat))
    script = (
        "import sys, torch\n"
        "from sfpo_megatron.protocol.ipc import decode_bucket\n"
        "out = decode_bucket(open(sys.argv[1]).read())\n"
        "print([(n, t.dtype == torch.bfloat16, float(t.double().sum())) for n, t in out])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "entry")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tensors = dict(mixed_bucket())
    expected = [
        (name, tensors[name].dtype == torch.bfloat16, float(tensors[name].double().sum()))
        for name in flat.names
    ]
    assert run.stdout.strip() == str(expected)


def test_sglang_reads_the_entry():
    common = pytest.importorskip("sglang.srt.utils.common", reason="sglang is not installed")
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    entry = encode_bucket(flatten(mixed_bucket()))
    payload = common.MultiprocessingSerializer.deserialize(entry)
    bucket = FlattenedTensorBucket(
        flattened_tensor=payload["flattened_tensor"], metadata=payload["metadata"]
    )
    tensors = dict(bucket.reconstruct_tensors())
    for name, tensor in mixed_bucket():
        assert torch.equal(tensors[name], tensor)


# ---------------------------------------------------------------- the embedded server


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = write_hf_config(tmp_path_factory.mktemp("cfg") / "m", "qwen3")
    return EmbeddedEngine(directory)


def test_server_checks_entries_and_loads_the_first(engine, tmp_path):
    server = EngineServer(engine, "m", tp_size=2)
    params = engine.weights.views
    torch.manual_seed(1)
    weights = [(name, torch.randn_like(p)) for name, p in params.items()]
    halves = [flatten(weights[: len(weights) // 2]), flatten(weights[len(weights) // 2 :])]
    body = {"serialized_named_tensors": [encode_bucket(halves[0])] * 2}
    body["load_format"] = "flattened_bucket"

    assert server.update_weights_from_tensor(body)["success"] is False  # no session
    assert server.begin_weight_update({})["success"]
    with pytest.raises(RequestError, match="1 serialized entries for 2 TP ranks"):
        server.update_weights_from_tensor({**body, "serialized_named_tensors": ["x"]})
    with pytest.raises(RequestError, match="'flattened_bucket' only"):
        server.update_weights_from_tensor({**body, "load_format": None})
    other = encode_bucket(halves[1])
    with pytest.raises(RequestError, match="TP rank 1's entry holds other tensors"):
        server.update_weights_from_tensor(
            {**body, "serialized_named_tensors": [encode_bucket(halves[0]), other]}
        )
    marker = tmp_path / "pwned"
    evil = base64.b64encode(pickle.dumps(Evil(marker))).decode()
    with pytest.raises(ValueError, match="posix.system is not allowed"):
        server.update_weights_from_tensor({**body, "serialized_named_tensors": [evil, evil]})
    assert not marker.exists()
    by_fd = io.BytesIO()
    ForkingPickler(by_fd).dump({"flattened_tensor": torch.zeros(4, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="'file_system' sharing strategy"):
        decode_bucket(base64.b64encode(by_fd.getvalue()).decode())
    with pytest.raises(ValueError, match="cannot unpickle"):
        decode_bucket("not base64!")
    assert server.update_requests == 0

    for flat, version in zip(halves, [None, "7"], strict=True):
        entries = [encode_bucket(flat), encode_bucket(flat)]
        request = {**body, "serialized_named_tensors": entries, "weight_version": version}
        assert server.update_weights_from_tensor(request)["success"]
    assert server.end_weight_update({})["success"]
    info = server.model_info({})
    assert info["weight_version"] == "7" and info["sfpo_update_requests"] == 2
    for name, tensor in weights:
        assert torch.equal(params[name], tensor)


def test_server_memory_tags_follow_sglang(engine):
    server = EngineServer(engine, "m")
    with pytest.raises(RequestError, match=r"cannot resume \['weights'\]: not released"):
        server.resume_memory_occupation({"tags": ["weights"]})
    server.release_memory_occupation({"tags": None})
    server.resume_memory_occupation({"tags": ["weights"]})
    with pytest.raises(RequestError, match=r"cannot resume \['weights'\]"):
        server.resume_memory_occupation({"tags": None})  # all: weights already back
    server.resume_memory_occupation({"tags": ["kv_cache", "cuda_graph"]})
    with pytest.raises(RequestError, match="unknown memory tags"):
        server.release_memory_occupation({"tags": ["activations"]})
    assert server.offloaded == set()


# ---------------------------------------------------------------- trainers end to end


@contextmanager
def stopped_when_done(report: Path, servers: list[ServerProcess]) -> Iterator[None]:
    """Stop the servers as soon as the trainer reported (or failed), at the latest on exit:
    each trainer rank's torch_shm_manager (spawned by its first shared-memory tensor) serves
    until every process connected to it is gone, servers included, and holds the launcher's
    output pipes, so the launch would not return while the servers live."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if report.exists() or any(report.parent.glob(report.name + ".failed*")):
                break
        for server in servers:
            server.stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def start_server(model_dir, tmp_path, index, tp_size):
    return start_embedded_server(
        model_dir, tmp_path / f"server{index}.log", "--tp-size", str(tp_size)
    )


@pytest.mark.parametrize(
    "layout_args, engine_tp",
    [(["parallel.tensor=2"], 2), (["parallel.data=2"], 1), (["parallel.pipeline=2"], 2)],
    ids=["tp2-one-engine", "dp2-two-engines", "pp2-one-engine"],
)
def test_colocated_sync_end_to_end(tmp_path, layout_args, engine_tp):
    save_random_hf_model(tmp_path / "m", "qwen3")
    servers = [start_server(tmp_path / "m", tmp_path, i, engine_tp) for i in range(2 // engine_tp)]
    report = tmp_path / "r.json"
    with stopped_when_done(report, servers):
        torchrun(
            2,
            TESTS / "dist" / "colocated_sync_worker.py",
            str(report),
            str(engine_tp),
            ",".join(s.url for s in servers),
            *small_run(tmp_path / "m"),
            *layout_args,
            timeout=300,
        )
    r = json.loads(report.read_text())
    ranks = r["ranks"]
    assert "must cover the 2 trainer ranks" in r["layout_error"]
    assert r["sample_versions"] == [1] and r["logprob_gap"] < 1e-4
    assert [info["weight_version"] for info in r["model_info"]] == ["2"] * len(servers)
    for key in ("first", "second"):  # every server holds every exported tensor, exactly
        assert sum(rank[key]["checked"] for rank in ranks) == r["expected_tensors"] * len(servers)
        assert all(not rank[key]["mismatched"] for rank in ranks)
    assert sum(rank["second"]["changed"] for rank in ranks) > 0  # training moved the weights
    buckets = sum(rank["second"]["buckets"] for rank in ranks if rank["second"]["checked"])
    assert buckets > 2
    for engine, info in enumerate(r["model_info"]):  # one request per bucket, all stages'
        leader = next(rank for rank in ranks if rank["leader"] and rank["engine"] == engine)
        assert leader["sent"] == info["sfpo_update_requests"] == buckets
        assert leader["versions"] == [None] * (buckets - 1) + ["2"]  # on the last bucket only
    assert all("must run between begin_weight_update" in rank["refused"] for rank in ranks)
    released = ["/release_memory_occupation", ["kv_cache", "weights", "cuda_graph"]]
    begin, end = ["/begin_weight_update", None], ["/end_weight_update", None]
    assert r["calls"][0] == [
        released,
        ["/resume_memory_occupation", ["weights"]],
        begin,
        end,
        ["/resume_memory_occupation", ["kv_cache", "cuda_graph"]],
        begin,
        end,
    ]
