"""Data-parallel rollout without servers: an embedded engine on every rank, fed by the actor's
export stream, each sampling its share of the prompts. Rank 0 reports the group's samples,
one engine's samples of the whole batch, and every rank the errors that an injected engine
failure and a wrong weight version (on the last rank) raised there.

Usage: torchrun --nproc_per_node N engine_group_worker.py REPORT_PREFIX key=value ...
"""

import sys

import torch
import torch.distributed as dist

from sfpo_megatron.common.errors import RolloutError
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import on_lead, shutdown
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.engine_group import EngineGroup
from sfpo_megatron.sync.in_process import sync_in_process
from sfpo_megatron.training.preflight import launch_checked


def main():
    report, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch, checkpoint = launch_checked(cfg)
    actor = Actor.build(cfg, arch, checkpoint)
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = EmbeddedEngine(hf_directory(cfg.model.hf_config))
    sync_in_process(actor.chunks, arch, engine, version=3, bucket_mb=0.05)
    group = EngineGroup(engine, list(range(world)))
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11], [99], [3, 4], [8, 8, 1, 2]]
    stops = tuple(range(0, arch.vocab_size, 9))
    params = SamplingParams(n=3, temperature=0.9, top_k=40, max_new_tokens=12,
                            stop_token_ids=stops, seed=17)
    rollouts = group(prompts, params)
    grouped, stats = on_lead(lambda: rollouts())
    single = engine.generate(prompts, params) if rank == 0 else None

    if rank == world - 1:
        def broken(*args, **kwargs):
            raise RuntimeError("injected engine failure")
        engine.generate = broken
    error = None
    try:
        failing = group(prompts, params)
        on_lead(lambda: failing())
    except RolloutError as raised:
        error = str(raised)
    version = engine.weight_version()
    if rank == world - 1:
        engine.weight_version = lambda: 2  # an engine that reports the wrong version
    sync_error = None
    try:
        sync_in_process(actor.chunks, arch, engine, version=4, bucket_mb=0.05)
    except RolloutError as raised:
        sync_error = str(raised)
    torch.save({"grouped": grouped, "single": single, "stats": stats, "error": error,
                "version": version, "sync_error": sync_error}, f"{report}.{rank}")
    shutdown()


if __name__ == "__main__":
    main()
