"""Megatron shards -> HF-named full tensors in size-bounded buckets (the one source for weight
sync and saving), and saving them as a checkpoint transformers and SGLang load."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from sfpo_megatron.hf.fp8 import QUANTIZATION_CONFIG, quantize_tensor
from sfpo_megatron.hf.load import INDEX, HFCheckpoint
from sfpo_megatron.hf.mapping import rules, split
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.models.sharding import local_parameters, sync_params, unshard

Bucket = list[tuple[str, torch.Tensor]]
SYNC_BUCKET_MB = 512
"""Bucket size of the export stream when it feeds a rollout engine (each weight sync); not a
config key (the HF export's shards are ``checkpoint.export_shard_mb``)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


# The model.dtype name of a safetensors / HF config dtype.
_SAFETENSORS_DTYPES = {"F64": "fp32", "F32": "fp32", "BF16": "bf16", "F16": "fp16"}
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def source_dtype(directory: str | Path, checkpoint: HFCheckpoint | None) -> str | None:
    """The dtype (``fp32``, ``bf16``, ``fp16``) a HF checkpoint stores: its weights' floating
    dtype (fp32 where they mix several), else, without weights, its config.json's
    ``torch_dtype`` / ``dtype``; None when neither says."""
    if checkpoint is not None:
        stored = {_SAFETENSORS_DTYPES.get(dtype) for dtype in checkpoint.dtypes.values()}
        stored.discard(None)
        if stored:
            return stored.pop() if len(stored) == 1 else "fp32"
    config = json.loads((Path(directory) / "config.json").read_text())
    return _CONFIG_DTYPES.get(config.get("torch_dtype") or config.get("dtype"))


def stage_leader() -> bool:
    """Whether this rank speaks for its pipeline stage (TP rank 0, DP rank 0): the export
    stream is whole and identical on the stage's other ranks, so only this one sends/writes."""
    return (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def export_stream(
    chunks: list, arch: ModelArch, bucket_mb: float = SYNC_BUCKET_MB, weight_format: str = "bf16"
) -> Iterator[Bucket]:
    """This pipeline stage's tensors under HF names, whole (TP gathered, QKV and fc1 split,
    vocabulary padding removed), in buckets of at most ``bucket_mb`` (a larger tensor is a
    bucket of its own). A collective over the TP group: every TP rank must iterate it.

    ``weight_format="fp8"``: each linear weight is quantized on its device as it comes
    (:mod:`~sfpo_megatron.hf.fp8`) and travels with its scale in one bucket; "bf16": the
    model's own dtype."""
    sync_params(chunks)
    limit = bucket_mb * 2**20
    by_name = {rule.megatron: rule for rule in rules(arch)}
    heads_per_group = arch.num_attention_heads // arch.num_query_groups
    bucket: Bucket = []
    size = 0
    for name, param in local_parameters(chunks, tied_copy=False):
        rule = by_name[name]
        full = unshard(name, param, chunks)
        if rule.vocab_rows:
            full = full[: arch.vocab_size]
        for hf_name, tensor in zip(
            rule.hf, split(rule, full, arch.head_dim, heads_per_group), strict=True
        ):
            parts = (
                quantize_tensor(hf_name, tensor) if weight_format == "fp8" else [(hf_name, tensor)]
            )
            nbytes = sum(t.numel() * t.element_size() for _, t in parts)
            if bucket and size + nbytes > limit:
                yield bucket
                bucket, size = [], 0
            bucket.extend((name, t.contiguous().cpu()) for name, t in parts)
            size += nbytes
    if bucket:
        yield bucket


def save_hf(
    chunks: list, arch: ModelArch, source: str | Path, out: str | Path, shard_mb: float = 2048
) -> None:
    """Write a HF checkpoint: safetensors shards (+ index), config.json and every non-weight
    file of ``source`` (tokenizer, generation config) copied through. Collective over all
    ranks; one writer per pipeline stage, into ``out`` + ``.partial`` on a filesystem all
    ranks share, renamed to ``out`` only once complete: a failure leaves ``out`` untouched."""
    out, source = Path(out), Path(source)
    partial = out.with_name(out.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    writer = stage_leader()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    for index, bucket in enumerate(export_stream(chunks, arch, shard_mb)):
        if writer:
            save_file(
                dict(bucket),
                str(partial / f"stage{stage:04d}-{index:05d}.safetensors"),
                metadata={"format": "pt"},
            )
    dist.barrier()
    if dist.get_rank() == 0:
        dtype = next(p for c in chunks for p in c.parameters()).dtype
        try:
            _finish(partial, source, out, dtype)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    dist.barrier()


def _finish(partial: Path, source: Path, out: Path, dtype: torch.dtype) -> None:
    """Name the shards as transformers does, write the index and config, copy the rest."""
    shards = sorted(partial.glob("stage*.safetensors"))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map, total = {}, 0
    for shard, name in zip(shards, names, strict=True):
        shard.rename(partial / name)
        with safe_open(str(partial / name), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                weight_map[key] = name
                total += math.prod(view.get_shape()) * _DTYPE_BYTES[view.get_dtype()]
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX).write_text(json.dumps(index, indent=2))
    config = json.loads((source / "config.json").read_text())
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _copy_non_weight_files(source, partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def _copy_non_weight_files(source: Path, out: Path) -> None:
    """Tokenizer, generation config and the like: every file but weights and config.json."""
    for path in source.iterdir():
        if (
            path.is_file()
            and path.name != "config.json"
            and not path.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copy2(path, out / path.name)


def write_served_fp8_model(source: str | Path, out: str | Path) -> Path:
    """A model directory for an fp8 SGLang server: ``source``'s config.json with the fp8
    block :data:`~sfpo_megatron.hf.fp8.QUANTIZATION_CONFIG` and its other non-weight files.
    No weights: the server starts with ``--load-format dummy`` and gets every weight from
    the first sync."""
    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _copy_non_weight_files(source, out)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out
