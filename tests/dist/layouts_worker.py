"""Run one update (the configured algorithm: a GRPO pass or an SFPO iteration) under several
parallel layouts in one torchrun launch (start-up dominates the cost on CPU). Rank 0 saves
each layout's log-probs before the update, metrics, and full state after it.

Usage: torchrun --nproc_per_node N layouts_worker.py SPEC.json
SPEC: {"layouts": {name: {"overrides": [...], "state": path, "batch": path}}, "out": dir}
where "state" is a full state (tests/full_state.py) and "batch" PolicyBatch fields.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.algorithms import build_update
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.policy.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from full_state import gather_full_state, load_full_state  # noqa: E402


def run_layout(overrides, state, batch_data):
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    chunks = build_model(cfg, arch)
    load_full_state(chunks, state)
    actor = Actor(cfg, arch, chunks, *build_optimizer(cfg, chunks))
    batch = PolicyBatch(**batch_data)
    logprobs, entropy = actor.forward_logprobs(PolicyBatch(batch.tokens, batch.response_mask))
    metrics = build_update(cfg.algorithm, actor).step(batch).metrics
    after = gather_full_state(chunks, arch.vocab_size)
    return {"logprobs": logprobs, "entropy": entropy, "metrics": metrics, "state": after}


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for name, layout in spec["layouts"].items():
        state, batch_data = torch.load(layout["state"]), torch.load(layout["batch"])
        result = run_layout(layout["overrides"], state, batch_data)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{name}.pt")
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
