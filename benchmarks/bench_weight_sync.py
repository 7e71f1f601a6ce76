"""Weight sync speed: the Megatron actor pushes its weights to a rollout server over the
export stream, in-process (the embedded default) and over HTTP + a gloo broadcast group
(SGLang's /update_weights_from_distributed protocol, against the embedded engine's server).

    python benchmarks/bench_weight_sync.py [--hidden 512 --layers 8 --vocab 32000] [--repeats 3]

Runs as one process on CPU (a GPU run would use NCCL; not measured here). Prints elements,
bytes, seconds per sync (median) and GB/s for each transport.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from sfpo_megatron.actor import Actor
from sfpo_megatron.config import load_config
from sfpo_megatron.distributed import shutdown
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.sglang_client import SGLangClient
from sfpo_megatron.sync.distributed import DistributedSync
from sfpo_megatron.sync.in_process import sync_in_process
from sfpo_megatron.trainer import start


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp()) / "model"
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    cfg = load_config(
        None,
        [
            f"model.hf_config={directory}",
            "model.dtype=fp32",
            "train.prompts_per_step=1",
            "train.samples_per_prompt=2",
            "train.mini_batch_prompts=1",
        ],
    )
    arch, checkpoint = start(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    elements = sum(p.numel() for c in actor.chunks for p in c.parameters())
    nbytes = elements * 4

    rows = []
    engine = EmbeddedEngine(directory)
    version = iter(range(1, 10_000))
    seconds = timed(
        lambda: sync_in_process(actor.chunks, arch, engine, next(version), args.bucket_mb),
        args.repeats,
    )
    rows.append(("in-process (embedded engine)", seconds))

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sfpo_megatron.rollout.http_server",
            "--hf-dir",
            str(directory),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = SGLangClient(f"http://127.0.0.1:{port}")
        client.wait_healthy(120)
        sync = DistributedSync([client], "127.0.0.1", free_port(), bucket_mb=args.bucket_mb)
        sync.connect()
        seconds = timed(lambda: sync.push(actor.chunks, arch, next(version)), args.repeats)
        rows.append((f"HTTP + gloo broadcast ({args.bucket_mb:g} MB buckets)", seconds))
    finally:
        server.kill()
    shutdown()

    print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"model: Qwen2 shape, {elements / 1e6:.1f} M params, fp32 = {nbytes / 2**20:.0f} MiB")
    print(f"{'transport':44s} {'s/sync':>8s} {'GB/s':>7s}")
    for name, seconds in rows:
        print(f"{name:44s} {seconds:8.3f} {nbytes / seconds / 1e9:7.2f}")


if __name__ == "__main__":
    main()
