"""Checks of the SFPO update's internals that need a real distributed optimizer, run under
torchrun; rank 0 writes a JSON report of what it measured.

For one bf16 layout: the snapshot holds exactly this rank's master-weight shard; after the
reposition every master weight equals snap + alpha (main - snap) bit for bit and every
model-param slice equals its master weight rounded to bf16; after the param sync all
data-parallel replicas hold identical parameters; and the only tensor SFPO allocates is its
snapshot (bytes counted by a dispatch mode that sees every op's new storages).

Usage: torchrun --nproc_per_node N sfpo_internals_worker.py REPORT.json STATE.pt BATCH.pt
       key=value ...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils._python_dispatch import TorchDispatchMode

from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.config import load_config
from sfpo_megatron.launch.parallel import init_distributed, shutdown
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.policy.optim import build_optimizer
from sfpo_megatron.algorithms.sfpo import SFPOUpdate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from full_state import load_full_state  # noqa: E402


class NewStorageBytes(TorchDispatchMode):
    """Sums the bytes of every storage an op returns that none of its inputs owned."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in owned:
                owned.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def measured(fn):
    mode = NewStorageBytes()
    with mode:
        fn()
    return mode.bytes


def replicas_identical(chunks) -> bool:
    """Every data-parallel replica holds bit-identical model params."""
    local = torch.cat([p.detach().float().view(-1) for c in chunks for p in c.parameters()])
    group = parallel_state.get_data_parallel_group()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(g, local) for g in gathered)


def main():
    report_path, state_path, batch_path, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    chunks = build_model(cfg, arch)
    load_full_state(chunks, torch.load(state_path))
    actor = Actor(cfg, arch, chunks, *build_optimizer(cfg, chunks))
    batch = PolicyBatch(**torch.load(batch_path))
    old, _ = actor.forward_logprobs(batch)
    batch.old_logprobs = old
    update = SFPOUpdate(actor, cfg.algorithm.sfpo)
    weights, snapshot, alpha = update.snapshot.weights, update.snapshot, cfg.algorithm.sfpo.alpha
    report = {"local_param_elements": sum(p.numel() for c in chunks for p in c.parameters())}

    report["capture_bytes"] = measured(snapshot.capture)
    report["snapshot_elements"] = snapshot.buffer.numel()
    report["master_elements"] = weights.numel
    report["snapshot_device"] = snapshot.buffer.device.type
    theta0 = [t.clone() for t in weights.mains]
    for _ in range(cfg.algorithm.sfpo.inner_steps):
        actor.train_pass(batch, before_step=snapshot.wait)
    theta_k = [t.clone() for t in weights.mains]
    report["reposition_bytes"] = measured(lambda: snapshot.reposition_(alpha))
    report["publish_bytes"] = measured(actor.publish_master_weights)
    report["masters_on_formula"] = all(
        torch.equal(m, s + alpha * (k - s)) for m, s, k in zip(weights.mains, theta0, theta_k)
    )
    report["models_are_rounded_masters"] = bool(weights.models) and all(
        torch.equal(model.view(-1), main.view(-1).to(model.dtype))
        for main, model in zip(weights.paired, weights.models)
    )
    if cfg.parallel.overlap_param_gather:
        # The all-gather is left to the next forward (as after any optimizer step): run it now
        # to see what that forward will see.
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)
    report["replicas_identical"] = replicas_identical(chunks)
    actor.train_pass(batch)
    report["second_capture_bytes"] = measured(snapshot.capture)
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
