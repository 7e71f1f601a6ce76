"""Rollouts from embedded engines on every rank fed by the Megatron actor's export stream
(in-process sync), each sampling half of the prompts, scored again by the actor: rank 0
reports both log-probs of every sampled token.

Usage: torchrun --nproc_per_node N rollout_worker.py REPORT.pt key=value ...
"""

import sys

import torch
import torch.distributed as dist

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import on_lead, shutdown
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.engine_group import EngineGroup
from sfpo_megatron.sync.in_process import sync_in_process
from sfpo_megatron.training.preflight import launch_checked


def main():
    report, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    engine = EmbeddedEngine(hf_directory(cfg.model.hf_config))
    sync_in_process(actor.chunks, arch, engine, version=1, bucket_mb=0.05)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11], [99], [3, 4]]
    params = SamplingParams(n=2, temperature=cfg.rollout.temperature, top_p=0.9,
                            max_new_tokens=6, seed=0)
    rollouts = EngineGroup(engine, list(range(dist.get_world_size())))(prompts, params)
    samples = [on_lead(lambda: rollouts()[0])]
    rows = [s.prompt_ids + s.output_ids for s in samples[0]]
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    engine_lp = torch.zeros(len(rows), width)
    for i, (row, sample) in enumerate(zip(rows, samples[0], strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        start_at = len(sample.prompt_ids)
        mask[i, start_at : len(row)] = True
        engine_lp[i, start_at : len(row)] = torch.tensor(sample.output_logprobs)
    actor_lp, _ = actor.forward_logprobs(PolicyBatch(tokens, mask))
    if dist.get_rank() == 0:
        versions = {s.weight_version for s in samples[0]}
        torch.save({"engine": engine_lp, "actor": actor_lp, "mask": mask,
                    "versions": sorted(versions), "engine_version": engine.weight_version()},
                   report)
    shutdown()


if __name__ == "__main__":
    main()
