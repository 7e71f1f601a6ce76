"""Import HF checkpoints under one layout per case, in one torchrun launch; rank 0 saves what
the tests compare with transformers: full logits, the actor's log-probs and entropy, the
exported checkpoint, and the sizes of the export stream's buckets.

Usage: torchrun --nproc_per_node N hf_worker.py SPEC.json
SPEC: {"out": dir, "cases": {name: [overrides]}, "tokens": path, "bucket_mb": float}
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.hf.export import export_stream, save_hf
from sfpo_megatron.hf.load import load_hf_weights
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.policy.optim import build_optimizer
from sfpo_megatron.training.preflight import launch_checked


def full_logits(actor, batch):
    """[N, S, vocab] logits on the last stage (gathered over TP: tests only)."""

    def collect(mb, logits):
        whole = gather_from_tensor_model_parallel_region(logits.float())
        return logits.new_zeros(()), torch.zeros((), dtype=torch.int), whole
    out = actor._run_schedule(actor.plan(batch, packing=False), collect, forward_only=True)
    return torch.cat(out)[..., : actor.arch.vocab_size] if out else None


def run_case(overrides, tokens, out_dir, bucket_mb):
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    chunks = build_model(cfg, arch)
    load_hf_weights(chunks, arch, checkpoint)
    actor = Actor(cfg, arch, chunks, *build_optimizer(cfg, chunks))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    batch = PolicyBatch(tokens, mask)
    result = {"logits": full_logits(actor, batch)}
    result["logprobs"], result["entropy"] = actor.forward_logprobs(batch)
    result["buckets"] = [sum(t.numel() * t.element_size() for _, t in b)
                         for b in export_stream(chunks, arch, bucket_mb)]
    result["bucket_tensors"] = [len(b) for b in export_stream(chunks, arch, bucket_mb)]
    save_hf(chunks, arch, hf_directory(cfg.model.hf_config), out_dir,
            cfg.checkpoint.export_shard_mb)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return result if last and parallel_state.get_tensor_model_parallel_rank() == 0 else None


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    tokens = torch.load(spec["tokens"])
    for name, overrides in spec["cases"].items():
        result = run_case(overrides, tokens, out / name, spec["bucket_mb"])
        if result is not None:
            torch.save(result, out / f"{name}.pt")
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
