"""Training checkpoints in Megatron's distributed format that resume bit-exactly: the model
chunks, the optimizer (fp32 master weights, Adam moments and step), the LR schedule, every
rank's RNG streams, the trainer's own JSON state, the KL reference policy when a resumed
run could not rebuild it (it was warm-started), and an off-policy run's batch sampled ahead
(``next_batch.pt``).

Layout under ``root``::

    iter_0000010/            a complete checkpoint (holds COMPLETE)
    iter_0000012.partial/    being written, or left by a job that died: never loaded
    latest                   the newest complete checkpoint's name, for people and tools

Every rank writes into ``iter_N.partial``; only after all of them finished does rank 0 add
the COMPLETE marker and rename the directory, so a job killed mid-write leaves nothing that
looks complete. The optimizer state is stored the way Megatron-LM stores it by default
(``dp_reshardable``), so a checkpoint is resumed under the layout that wrote it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)

from sfpo_megatron.common.files import write_atomic
from sfpo_megatron.models.gpt import unwrap

if TYPE_CHECKING:
    from sfpo_megatron.policy.actor import Actor
    from sfpo_megatron.policy.kl_reference import ReferencePolicy

MARKER = "COMPLETE"
REFERENCE = "kl_reference"
TRAINER_STATE = "trainer_state.json"
NEXT_BATCH = "next_batch.pt"
LATEST = "latest"
PARTIAL = ".partial"
_COMPLETE_NAME = re.compile(r"iter_(\d+)")
# What Megatron-LM passes to sharded_state_dict: the distributed optimizer saves each rank's
# buffer shard as is (parallel, no gather), reshardable over data parallelism only.
_SHARDING = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    """Where the complete checkpoint of ``iteration`` lives."""
    return Path(root) / f"iter_{iteration:07d}"


def require_complete(path: str | Path) -> dict[str, Any]:
    """The COMPLETE marker of the checkpoint at ``path``; raises naming the path when it is
    missing or was never completed."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.name.endswith(PARTIAL) or not (path / MARKER).is_file():
        raise ValueError(
            f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted "
            f"or, for an asynchronous save, never finalized"
        )
    return json.loads((path / MARKER).read_text())


def latest_complete(root: str | Path) -> Path | None:
    """The complete checkpoint of the highest iteration under ``root`` (None if there is none).

    Decided by the directories themselves, not by ``latest``: a job killed between the
    rename and the pointer update still resumes from its newest checkpoint."""
    root = Path(root)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _COMPLETE_NAME.fullmatch(entry.name)
            if match and (entry / MARKER).is_file():
                found.append((int(match.group(1)), entry))
    return max(found)[1] if found else None


def _layout(actor: Actor) -> dict[str, int]:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": len(actor.chunks),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object() -> ShardedObject:
    """Every rank's RNG state: one object per (PP, TP) position holding its DP ranks' states
    (gathered, so that the DP rank writing it covers the others)."""
    group = parallel_state.get_data_parallel_group()
    states: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, _rng_state(), group=group)
    return ShardedObject(
        "rng_state",
        states,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _model_key(index: int, chunks: int) -> str:
    """Megatron-LM's keys: ``model``, or ``model0``, ``model1``... with virtual pipelining."""
    return "model" if chunks == 1 else f"model{index}"


def _reference_sharded(
    model_state: dict[str, Any], frozen: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The reference policy's tensors as a model chunk's sharded entries (same shapes and
    sharding, keys under ``kl_reference.``)."""
    missing = frozen.keys() - model_state.keys()
    if missing:
        raise KeyError(f"no sharded entry for the reference's params {sorted(missing)[:3]}")
    return {
        name: replace(model_state[name], key=f"{REFERENCE}.{model_state[name].key}", data=tensor)
        for name, tensor in frozen.items()
    }


def _sharded_state_dict(
    actor: Actor, is_loading: bool, reference: ReferencePolicy | None
) -> dict[str, Any]:
    metadata = {
        **_SHARDING,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    state: dict[str, Any] = {
        _model_key(i, len(actor.chunks)): unwrap(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(actor.chunks)
    }
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=metadata
    )
    state["opt_param_scheduler"] = actor.scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    if reference is not None:  # after the optimizer's entries, which map model params by key
        state[REFERENCE] = {
            _model_key(i, len(actor.chunks)): _reference_sharded(
                state[_model_key(i, len(actor.chunks))], frozen
            )
            for i, frozen in enumerate(reference.by_name())
        }
    return state


def _torch_adams(actor: Actor) -> list[torch.optim.Optimizer]:
    """The torch.optim Adam(W) instances inside Megatron's optimizer (its fallback when
    neither Transformer Engine nor Apex is installed)."""
    chain = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    inner = (megatron_optimizer.optimizer for megatron_optimizer in chain)
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def _materialize_adam_state(actor: Actor) -> None:
    """Create torch Adam's lazily made state (step and moments, to be overwritten by the
    load): the distributed optimizer's load path reads the step from it and fails on a
    fresh optimizer."""
    for opt in _torch_adams(actor):
        for group in opt.param_groups:
            for param in group["params"]:
                if not opt.state[param]:
                    opt.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def _restore_adam_steps(actor: Actor) -> None:
    """Give every param its own Adam step again, the one its group was saved with.

    With torch's Adam, megatron-core's distributed optimizer loads a single step tensor shared
    by all params (torch's Adam adds 1 to it once per param and step) and then copies the
    load template's step into it. The loaded step is left in each param group."""
    for opt in _torch_adams(actor):
        for group in opt.param_groups:
            if "step" in group:
                for param in group["params"]:
                    opt.state[param]["step"] = torch.tensor(float(group["step"]))


def _gather_model_params(actor: Actor) -> None:
    """With an overlapped param all-gather the model params are completed lazily at the next
    forward; complete them now so the checkpoint holds what the next forward would see."""
    for chunk in actor.chunks:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _commit(
    staging: Path, final: Path, trainer_state: str, next_batch: Any, marker: dict[str, Any]
) -> None:
    """Collective, once every rank's files are written: add the trainer state (and the next
    batch, if any) and the marker, rename, point ``latest``."""
    if dist.get_rank() == 0:
        (staging / TRAINER_STATE).write_text(trainer_state)
        if next_batch is not None:
            torch.save(next_batch, staging / NEXT_BATCH)
        write_atomic(staging / MARKER, json.dumps(marker))
        if final.exists():  # the same iteration saved again, e.g. after resuming an older one
            shutil.rmtree(final)
        os.replace(staging, final)
        write_atomic(final.parent / LATEST, final.name)
    dist.barrier()


class CheckpointManager:
    """Saves training checkpoints under ``root``.

    With ``async_save`` a background process writes the tensors while training goes on; the
    checkpoint becomes complete at :meth:`finalize` or at the next :meth:`save`, and stays
    ``.partial`` (never loaded) if the job ends before either.
    """

    def __init__(self, root: str | Path, async_save: bool = False) -> None:
        self.root = Path(root)
        self.async_save = async_save
        self._queue = AsyncCallsQueue() if async_save else None

    def save(
        self,
        iteration: int,
        actor: Actor,
        state: dict[str, Any],
        reference: ReferencePolicy | None = None,
        next_batch: Any = None,
    ) -> Path:
        """Collective on all ranks. ``state`` (JSON, the same on every rank) is stored as
        trainer_state.json, ``reference`` (if given) beside the model, ``next_batch`` (rank
        0's; an off-policy run's batch sampled ahead) as next_batch.pt. Returns the
        checkpoint's final path (for an asynchronous save, where it will be once finalized)."""
        trainer_state = json.dumps(state, indent=1)  # raises on every rank if it cannot
        self.finalize()
        final = checkpoint_dir(self.root, iteration)
        staging = final.with_name(final.name + PARTIAL)
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a job that died mid-write
            staging.mkdir(parents=True)
        _gather_model_params(actor)
        dist.barrier()
        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        request = dist_checkpointing.save(
            _sharded_state_dict(actor, is_loading=False, reference=reference),
            str(staging),
            strategy,
            async_sharded_save=self.async_save,
            content_metadata=dict(_SHARDING),
        )
        marker = {"iteration": iteration, **_layout(actor), REFERENCE: reference is not None}
        commit = partial(_commit, staging, final, trainer_state, next_batch, marker)
        if request is None:
            commit()
        else:
            request.add_finalize_fn(commit)
            self._queue.schedule_async_request(request)
        return final

    def finalize(self) -> None:
        """Collective: wait for a pending asynchronous save and complete it (no-op if none)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)


def load_next_batch(path: str | Path) -> Any:
    """The batch sampled ahead that the complete checkpoint at ``path`` stores, or None."""
    file = Path(path) / NEXT_BATCH
    return torch.load(file, weights_only=False) if file.is_file() else None


def holds_reference(path: str | Path) -> bool:
    """Whether the complete checkpoint at ``path`` stores a KL reference policy."""
    return bool(require_complete(path).get(REFERENCE))


@torch.no_grad()
def load_checkpoint(
    path: str | Path, actor: Actor, reference: ReferencePolicy | None = None
) -> dict[str, Any]:
    """Collective: restore ``actor`` (model, optimizer, LR schedule), this rank's RNG streams
    and ``reference`` (if given; the checkpoint must hold one, see :func:`holds_reference`)
    from the complete checkpoint at ``path``; returns the trainer state saved with it.

    The layout must be the one that wrote the checkpoint."""
    path = Path(path)
    marker = require_complete(path)
    saved = {key: marker.get(key) for key in _layout(actor)}
    if saved != _layout(actor):
        raise ValueError(
            f"checkpoint {path} was written with layout {saved}; this run is {_layout(actor)}"
        )
    if reference is not None and not marker.get(REFERENCE):
        raise ValueError(f"checkpoint {path} holds no KL reference policy")
    _materialize_adam_state(actor)
    state = dist_checkpointing.load(
        _sharded_state_dict(actor, is_loading=True, reference=reference), str(path)
    )
    for i, chunk in enumerate(actor.chunks):
        chunk.load_state_dict(state[_model_key(i, len(actor.chunks))])
    actor.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(actor)
    actor.scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng(state["rng_state"][parallel_state.get_data_parallel_rank()])
    if reference is not None:
        keys = [_model_key(i, len(actor.chunks)) for i in range(len(actor.chunks))]
        reference.load([state[REFERENCE][key] for key in keys])
    return json.loads((path / TRAINER_STATE).read_text())
