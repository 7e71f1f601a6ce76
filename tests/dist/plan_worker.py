"""Count the device bytes a rank really holds per memory component, for several layouts in
one torchrun launch (start-up dominates on CPU); tests/test_plan.py compares them with
``sfpo_megatron.tools.plan``.

Per layout: build the actor, run one training pass (one optimizer step, so Adam's states
exist), build the SFPO update and capture its snapshot, then sum the bytes of the distinct
storages behind: the model params (DDP's param buffer under the distributed optimizer),
``param.main_grad`` (DDP's grad buffers), the torch optimizers' params that are not model
storage (fp32 master copies), their ``exp_avg`` / ``exp_avg_sq``, and the snapshot buffer.

Usage: torchrun --nproc_per_node N plan_worker.py SPEC.json
SPEC: {"out": path of the JSON report, "layouts": {name: [key=value, ...]}}
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.algorithms.sfpo import SFPOUpdate


def storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the distinct storages behind ``tensors``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def batch_for(arch, sequences: int) -> PolicyBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (sequences, 16), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 5:] = True
    return PolicyBatch(tokens, mask, advantages=torch.randn(sequences, generator=g))


def measure(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    actor = Actor.build(cfg, arch)
    batch = batch_for(arch, cfg.sequences_per_step)
    batch.old_logprobs, _ = actor.forward_logprobs(batch)
    actor.train_pass(batch)
    update = SFPOUpdate(actor, cfg.algorithm.sfpo)
    update.snapshot.capture()

    params = [p for chunk in actor.chunks for p in chunk.parameters()]
    weights = storages(params)
    inner = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    torch_optimizers = [o.optimizer for o in inner]
    mains = [p for o in torch_optimizers for g in o.param_groups for p in g["params"]]
    states = [o.state[p] for o in torch_optimizers for p in o.state]
    masters = {k: v for k, v in storages(mains).items() if k not in weights}
    adam = storages([s[key] for s in states for key in ("exp_avg", "exp_avg_sq")])
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "data_rank": parallel_state.get_data_parallel_rank(),
        "tensor_rank": parallel_state.get_tensor_model_parallel_rank(),
        "weights": sum(weights.values()),
        "gradients": sum(storages(p.main_grad for p in params).values()),
        "master weights": sum(masters.values()),
        "adam states": sum(adam.values()),
        "sfpo snapshot": update.snapshot.buffer.untyped_storage().nbytes(),
        "stepped_elements": update.snapshot.weights.numel,
        "param_elements": sum(p.numel() for p in params),
        "states_per_main": len(states) == len(mains),
    }


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    report = {}
    for name, overrides in spec["layouts"].items():
        record = measure(overrides)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        report[name] = gathered
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
