"""Save and resume training checkpoints under several layouts in one torchrun launch.

``save`` phase, per layout: train 2 iterations, save at iteration 2 with a KL reference
policy captured after iteration 1, record what the checkpoint holds and a draw from every RNG,
train 2 more iterations and record again. ``resume`` phase (a fresh launch), per layout: build
the actor (and its reference) from another seed, load the checkpoint, record the same things
at the same points. Each rank writes its records to OUT/NAME.PHASE.rankR.pt; the test
compares them.

An asynchronous layout also saves at iteration 4 (without a reference), and records whether
each checkpoint directory is complete before and after the save is finalized; resuming, it
records the error of asking that checkpoint for a reference.

Usage: torchrun --nproc_per_node N train_checkpoint_worker.py {save,resume} SPEC.json
SPEC: {"out": dir, "layouts": {name: {"overrides": [...], "async": bool, "foreign": name}}}
where the optional "foreign" names a layout whose checkpoint this one must refuse to load.
"""

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# sfpo_megatron (Megatron-Core) is imported inside the functions: the checkpoint writer
# starts a helper process by "spawn" (megatron-core's write-results queue), which runs this
# file's top level again, and that import would cost it seconds.
SAVE_AT, RESUME_SEED = 2, 999


def train_iteration(actor, arch, iteration: int) -> None:
    from layouts import make_batch

    from sfpo_megatron.policy.batch import PolicyBatch

    batch = PolicyBatch(**make_batch(arch, seed=iteration))
    old_logprobs, _ = actor.forward_logprobs(batch)
    actor.train_pass(replace(batch, old_logprobs=old_logprobs))
    actor.step_lr()


def snapshot(actor) -> dict:
    """This rank's model params, master weights, Adam state and learning rates."""
    adam = []
    for inner in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                adam.append({k: v.clone() for k, v in inner.optimizer.state[param].items()})
    return {
        "params": {
            f"{i}.{name}": p.detach().clone()
            for i, chunk in enumerate(actor.chunks)
            for name, p in chunk.named_parameters()
        },
        "masters": [t.clone() for t in actor.master_weights().mains],
        "adam": adam,
        "lr": [group["lr"] for group in actor.optimizer.param_groups],
        "scheduler_steps": actor.scheduler.num_steps,
    }


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3)]


def completeness(root: Path) -> dict[str, bool]:
    dist.barrier()
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(root.iterdir()) if p.is_dir()}


def run_layout(phase: str, layout: dict, root: Path) -> dict:
    from sfpo_megatron.policy.actor import Actor
    from sfpo_megatron.training.train_checkpoint import (
        CheckpointManager,
        checkpoint_dir,
        latest_complete,
        load_checkpoint,
    )
    from sfpo_megatron.config import load_config
    from sfpo_megatron.launch.parallel import init_distributed
    from sfpo_megatron.models.arch import read_hf_config
    from sfpo_megatron.policy.kl_reference import ReferencePolicy

    overrides = layout["overrides"] + ([f"model.seed={RESUME_SEED}"] if phase == "resume" else [])
    cfg = load_config(None, overrides)
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    actor = Actor.build(cfg, arch)
    reference = ReferencePolicy(actor)
    record: dict = {}
    if phase == "save":
        for iteration in range(1, SAVE_AT + 1):
            train_iteration(actor, arch, iteration)
            if iteration == 1:
                reference.capture()
        manager = CheckpointManager(root, async_save=layout["async"])
        manager.save(SAVE_AT, actor, {"iteration": SAVE_AT, "cursor": [3, 1]}, reference)
        record["dirs_after_save"] = completeness(root)
    else:
        if "foreign" in layout:  # another layout's checkpoint must be refused
            try:
                load_checkpoint(latest_complete(root.parent / layout["foreign"]), actor)
            except ValueError as error:
                record["foreign_error"] = str(error)
        # The asynchronous layout also saved a later checkpoint: name the one to resume.
        path = checkpoint_dir(root, SAVE_AT) if layout["async"] else latest_complete(root)
        if layout["async"]:
            try:
                load_checkpoint(latest_complete(root), actor, reference)
            except ValueError as error:
                record["no_reference_error"] = str(error)
        record["trainer_state"] = load_checkpoint(path, actor, reference)
    record["reference"] = [t.clone() for t in reference.frozen]
    record["at_checkpoint"] = snapshot(actor)
    record["draws"] = draws()
    for iteration in range(SAVE_AT + 1, SAVE_AT + 3):
        train_iteration(actor, arch, iteration)
    record["after"] = snapshot(actor)
    if phase == "save" and layout["async"]:
        record["dirs_after_training"] = completeness(root)
        manager.save(SAVE_AT + 2, actor, {"iteration": SAVE_AT + 2})
        record["dirs_after_second_save"] = completeness(root)
        manager.finalize()
        record["dirs_after_finalize"] = completeness(root)
    if phase == "save":
        record["latest"] = (root / "latest").read_text()
    return record


def main():
    from sfpo_megatron.launch.parallel import shutdown

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    phase, spec_path = sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for name, layout in spec["layouts"].items():
        record = run_layout(phase, layout, out / name)
        torch.save(record, out / f"{name}.{phase}.rank{dist.get_rank()}.pt")
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
