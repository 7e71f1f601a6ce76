"""Weight decay groups and the warm start's learning rate on a real Megatron optimizer.

One launch, a JSON spec of overrides ``{"decay": [...], "warm_start": [...]}``.

``decay``: for optimizer.decay_norms_and_biases false and true, the weight decay of every
param's group, and each param before and after one optimizer step on zero gradients (AdamW's
decoupled decay is then the only change).
``warm_start``: a warm start (KL on) under an LR warm-up: the LRs the optimizer stepped
with, the schedule's state and the groups' LRs before and after, the answers' NLL.

Usage: torchrun --nproc_per_node 1 optim_worker.py OUT.pt SPEC_JSON
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.models.gpt import build_model, unwrap
from sfpo_megatron.policy.optim import build_optimizer
from sfpo_megatron.algorithms.warm_start import answer_batch, warm_start

WARM_START_STEPS = 3


def decay_groups(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    chunks = build_model(cfg, arch)
    optimizer, _ = build_optimizer(cfg, chunks)
    decay_of = {
        id(param): group["weight_decay"]
        for group in optimizer.param_groups
        for param in group["params"]
    }
    named = list(unwrap(chunks[0]).named_parameters())
    before = {name: param.detach().clone() for name, param in named}
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    succeeded, _, _ = optimizer.step()
    assert succeeded
    return {
        name: {
            "weight_decay": decay_of[id(param)],
            "dim": param.dim(),
            "before": before[name],
            "after": param.detach().clone(),
        }
        for name, param in named
    }


class Prompts:
    """What warm_start reads of a PromptSet: batches of (index, prompt ids, record)."""

    def __init__(self, vocab: int) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.vocab = vocab

    def next_batch(self, rows: int) -> list:
        prompts = torch.randint(2, self.vocab, (rows, 5), generator=self.generator)
        return [(i, ids.tolist(), SimpleNamespace(answer="7")) for i, ids in enumerate(prompts)]


def warm_start_lrs(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    actor = Actor.build(cfg, arch)
    groups = actor.optimizer.param_groups
    record = {
        "lr_before": [g["lr"] for g in groups],
        "schedule_before": actor.scheduler.state_dict(),
        "stepped_lrs": [],
    }
    step = actor.optimizer.step

    def recording_step():
        record["stepped_lrs"].append([g["lr"] for g in groups])
        return step()

    actor.optimizer.step = recording_step
    prompts = Prompts(arch.vocab_size)
    probe = answer_batch(Prompts(arch.vocab_size).next_batch(4), lambda _: [7], 1, 8)
    record["nll_before"] = -float(actor.forward_logprobs(probe)[0].sum())
    warm_start(actor, prompts, lambda _: [7], 1, WARM_START_STEPS, cfg.train.warm_start_lr)
    record["nll_after"] = -float(actor.forward_logprobs(probe)[0].sum())
    record["lr_after"] = [g["lr"] for g in groups]
    record["schedule_after"] = actor.scheduler.state_dict()
    actor.step_lr()
    record["lr_after_first_rl_step"] = [g["lr"] for g in groups]
    return record


def main():
    out, spec = sys.argv[1:]
    runs = json.loads(spec)
    result = {
        "decay": {
            flag: decay_groups(runs["decay"] + [f"optimizer.decay_norms_and_biases={flag}"])
            for flag in ("false", "true")
        },
        "warm_start": warm_start_lrs(runs["warm_start"]),
    }
    torch.save(result, Path(out))
    shutdown()


if __name__ == "__main__":
    main()
