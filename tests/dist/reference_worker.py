"""The KL reference policy under a real layout: after the actor trained, the reference still
gives the initial model's log-probs, and swapping it in and out leaves the actor unchanged.

Usage: torchrun --nproc_per_node N reference_worker.py REPORT.json key=value ...
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.policy.kl_reference import ReferencePolicy


def main():
    report_path, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    actor = Actor.build(cfg, arch)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (8, 12), generator=generator)
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[:, 4:] = True
    batch = PolicyBatch(tokens, mask, advantages=torch.randn(8, generator=generator))
    initial, _ = actor.forward_logprobs(batch)
    reference = ReferencePolicy(actor)
    actor.train_pass(replace(batch, old_logprobs=initial))
    trained, _ = actor.forward_logprobs(batch)
    from_reference = reference.logprobs(batch)
    after_swap, _ = actor.forward_logprobs(batch)
    if dist.get_rank() == 0:
        report = {
            "reference_is_initial": torch.equal(from_reference, initial),
            "actor_unchanged_by_swap": torch.equal(after_swap, trained),
            "training_changed_logprobs": not torch.equal(trained, initial),
        }
        Path(report_path).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
