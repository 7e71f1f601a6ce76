"""Weight sync speed: the Megatron actor pushes its weights to a rollout engine over the export
stream, in-process (the embedded default), over HTTP + a broadcast group (SGLang's
/update_weights_from_distributed protocol; NCCL on GPU, gloo on CPU) and colocated (SGLang's
/update_weights_from_tensor with IPC handles: CUDA IPC on GPU, shared memory on CPU), both
against the embedded engine's server on the same device.

    python benchmarks/bench_weight_sync.py [--hidden 512 --layers 8 --vocab 32000] [--repeats 3]
    python benchmarks/bench_weight_sync.py --hidden 1536 --layers 28 --vocab 151936   # ~1.5B
    python benchmarks/bench_weight_sync.py --weight-format fp8   # + an fp8 row per transport

One trainer process (TP1): fp32 on CPU, bf16 on GPU. Prints elements, bytes, seconds per sync
(median of --repeats after one warm-up) and GB/s for each transport, beside a plain copy of
the same bytes on the device (the memory-bandwidth bound of one read and one write). With
``--weight-format fp8`` every transport also syncs fp8 rollout weights (e4m3 linear weights
with 128x128 block scales, quantized on the trainer side) in the same run, and the bytes each
format sends per sync are printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_actor import timed
from transformers import AutoModelForCausalLM, Qwen2Config

from sfpo_megatron.config import RolloutConfig, load_config
from sfpo_megatron.hf.export import export_stream
from sfpo_megatron.launch.parallel import free_port, shutdown
from sfpo_megatron.models.gpt import DTYPES
from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.sglang_client import SGLangClient
from sfpo_megatron.sync.broadcast import DistributedSync
from sfpo_megatron.sync.colocated import ColocatedSync
from sfpo_megatron.sync.in_process import sync_in_process
from sfpo_megatron.training.preflight import launch_checked


def copy_seconds(nbytes: int, repeats: int) -> float:
    """One read and one write of ``nbytes`` on the device: the bound of any sync."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return timed(lambda: target.copy_(source), repeats, warmup=1)


def stream_bytes(actor, arch, weight_format: str) -> tuple[int, int]:
    """Bytes one sync sends in ``weight_format``: all tensors, and the decoder linear weights
    (with their fp8 scales) alone."""
    total = linear = 0
    for bucket in export_stream(actor.chunks, arch, weight_format=weight_format):
        for name, tensor in bucket:
            nbytes = tensor.numel() * tensor.element_size()
            total += nbytes
            if name.startswith("model.layers.") and tensor.dim() == 2:
                linear += nbytes
    return total, linear


def in_process_seconds(actor, arch, directory: Path, dtype, version, args, fmt: str) -> float:
    """The embedded engine on the trainer's device, synced in process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = EmbeddedEngine(directory, device, dtype)
    return timed(
        lambda: sync_in_process(actor.chunks, arch, engine, next(version), args.bucket_mb, fmt),
        args.repeats,
        warmup=1,
    )


def served_seconds(directory: Path, dtype: str, sync_with, repeats: int) -> float:
    """Seconds per sync to a fresh embedded-engine server on this device; ``sync_with(client)``
    connects and returns the sync to time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    port = free_port()
    command = [sys.executable, "-m", "sfpo_megatron.rollout.http_server", "--hf-dir"]
    command += [str(directory), "--port", str(port), "--device", device, "--dtype", dtype]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        client = SGLangClient(f"http://127.0.0.1:{port}", RolloutConfig.request_timeout_s)
        client.wait_healthy(300)
        return timed(sync_with(client), repeats, warmup=1)
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weight-format", choices=("bf16", "fp8"), default="bf16")
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
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    server_dtype = str(DTYPES[dtype]).removeprefix("torch.")
    cfg = load_config(
        None,
        [
            f"model.hf_config={directory}",
            f"model.dtype={dtype}",
            "train.prompts_per_step=1",
            "train.samples_per_prompt=2",
            "train.mini_batch_prompts=1",
        ],
    )
    arch, checkpoint = launch_checked(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    elements = sum(p.numel() for c in actor.chunks for p in c.parameters())
    nbytes = elements * DTYPES[dtype].itemsize
    version = iter(range(1, 10_000))
    formats = ["bf16"] + (["fp8"] if args.weight_format == "fp8" else [])
    sent = {fmt: stream_bytes(actor, arch, fmt) for fmt in formats}
    rows = [
        ("copy_ of the same bytes on the device (reference)", copy_seconds(nbytes, args.repeats))
    ]

    def broadcast(fmt: str):
        def connect(client: SGLangClient):
            sync = DistributedSync(
                [client],
                "127.0.0.1",
                free_port(),
                bucket_mb=args.bucket_mb,
                timeout_s=cfg.parallel.timeout_s,
                weight_format=fmt,
            )
            sync.connect()
            return lambda: sync.push(actor.chunks, arch, next(version))

        return connect

    def colocated(fmt: str):
        def connect(client: SGLangClient):
            push = ColocatedSync([client], bucket_mb=args.bucket_mb, weight_format=fmt)
            return lambda: push.push(actor.chunks, arch, next(version))

        return connect

    buckets = f"{args.bucket_mb:g} MB buckets"
    for fmt in formats:
        suffix = ", fp8" if fmt == "fp8" else ""
        rows.append(
            (
                f"in-process (embedded engine){suffix}",
                in_process_seconds(actor, arch, directory, DTYPES[dtype], version, args, fmt),
            )
        )
    for fmt in formats:
        suffix = ", fp8" if fmt == "fp8" else ""
        rows.append(
            (
                f"HTTP + {'NCCL' if cuda else 'gloo'} broadcast ({buckets}){suffix}",
                served_seconds(directory, server_dtype, broadcast(fmt), args.repeats),
            )
        )
    for fmt in formats:
        suffix = ", fp8" if fmt == "fp8" else ""
        rows.append(
            (
                f"colocated, {'CUDA IPC' if cuda else 'shared memory'} ({buckets}){suffix}",
                served_seconds(directory, server_dtype, colocated(fmt), args.repeats),
            )
        )
    shutdown()

    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"model: Qwen2 shape, {elements:,} params, {dtype} = {nbytes / 2**20:.1f} MiB")
    if "fp8" in sent:
        (full, full_linear), (fp8, fp8_linear) = sent["bf16"], sent["fp8"]
        print(
            f"bytes/sync: {dtype} {full / 2**20:.1f} MiB, fp8 {fp8 / 2**20:.1f} MiB "
            f"({fp8 / full:.3f}x); linear weights {full_linear / 2**20:.1f} -> "
            f"{fp8_linear / 2**20:.1f} MiB ({fp8_linear / full_linear:.3f}x)"
        )
    print(f"{'transport':52s} {'s/sync':>9s} {'GB/s':>7s}")
    for label, seconds in rows:
        moved = sent["fp8"][0] if label.endswith(", fp8") else nbytes
        print(f"{label:52s} {seconds:9.4g} {moved / seconds / 1e9:7.3g}")


if __name__ == "__main__":
    main()
