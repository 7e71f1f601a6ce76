"""Building a run: every part it holds, made in one place before anything runs (nothing is
started or trained here; see :mod:`~sfpo_megatron.training.start` and
:mod:`~sfpo_megatron.training.hooks` for what happens to them)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from sfpo_megatron.algorithms import PolicyUpdate, build_update
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.config import Config
from sfpo_megatron.data.prompts import BatchItem, PromptSet
from sfpo_megatron.data.rewards import RewardComputer
from sfpo_megatron.hf.load import HFCheckpoint
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.kl_reference import ReferencePolicy
from sfpo_megatron.rollout.scoring import RolloutScorer
from sfpo_megatron.training.preflight import load_inputs
from sfpo_megatron.training.rollout_backend import RolloutLink, build_backend
from sfpo_megatron.training.sampling import training_sampling
from sfpo_megatron.training.stop_request import StopRequest
from sfpo_megatron.training.train_checkpoint import CheckpointManager

if TYPE_CHECKING:
    from sfpo_megatron.training.collection import Collected


@dataclass
class Run:
    """The parts of one training run, and its progress (``iteration`` = the last one
    completed). A context manager: leaving it gives every resource back."""

    cfg: Config
    arch: ModelArch
    tokenizer: Any
    prompts: PromptSet
    eval_items: list[BatchItem]
    actor: Actor
    update: PolicyUpdate
    kl_reference: ReferencePolicy | None
    """The policy the KL term pulls towards (``algorithm.kl_coef > 0``): the model as built,
    replaced by the warm-started weights, or by a checkpoint's."""
    rollout: RolloutLink
    scorer: RolloutScorer
    train_checkpoints: CheckpointManager | None
    """Training-state checkpoints (``checkpoint.dir``), not the HF weights a run starts from."""
    stop_request: StopRequest
    resources: ExitStack = field(repr=False)
    iteration: int = 0
    rollouts: int = 0
    """Training samples generated so far (every round; no evaluation)."""
    best: dict[str, float] | None = None
    """The best evaluation so far: ``{"iteration": i, "eval/macro": score}``."""
    next_batch: Collected | None = None
    """One step off-policy: the next iteration's batch, sampled while this one trained (saved
    with a checkpoint, so a resumed run trains on the very same samples)."""
    stopping: bool = False
    """A stop was asked for: the run ends after the current iteration's checkpoint."""

    def sampling(self, iteration: int, round_index: int) -> SamplingParams:
        """Training round ``round_index`` of ``iteration``."""
        return training_sampling(self.cfg, self.tokenizer.eos_token_id, iteration, round_index)

    def training_state(self) -> dict[str, Any]:
        """What a training checkpoint stores besides tensors (JSON, the same on every rank)."""
        return {
            "iteration": self.iteration,
            "rollouts": self.rollouts,
            "data": self.prompts.state_dict(),
            "update": self.update.state_dict(),
            "best": self.best,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.rollouts = state["rollouts"]
        self.prompts.load_state_dict(state["data"])
        self.update.load_state_dict(state["update"])
        self.best = state["best"]

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Complete a pending checkpoint, stop the reward processes and rollout servers, give
        back the stop signals and close the metrics log; safe to call twice."""
        self.resources.close()


def build_run(cfg: Config, arch: ModelArch, hf_weights: HFCheckpoint | None) -> Run:
    """Every part of a run (collective), after the pre-flight checks of its inputs. The actor
    starts from ``hf_weights`` (None: random initialization)."""
    inputs = load_inputs(cfg, arch)
    rank0 = dist.get_rank() == 0
    with ExitStack() as resources:
        actor = Actor.build(cfg, arch, hf_weights)
        kl_reference = ReferencePolicy(actor) if cfg.algorithm.kl_coef > 0 else None
        update = build_update(cfg.algorithm, actor)
        backend = build_backend(cfg, arch, actor.device)
        resources.callback(backend.close)
        rollout = RolloutLink(backend, actor)
        rewards = None
        if rank0:
            rewards = resources.enter_context(
                RewardComputer(cfg.reward.fn, cfg.reward.workers, cfg.reward.timeout_s)
            )

        def decode(ids: list[int]) -> str:
            return inputs.tokenizer.decode(ids, skip_special_tokens=True)

        scorer = RolloutScorer(
            rollout.generation, decode if rank0 else None, rewards, rollout.recover_rollouts
        )
        train_checkpoints = None
        if cfg.checkpoint.dir:
            train_checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.async_save)
            resources.callback(train_checkpoints.finalize)
        stop_request = StopRequest(cfg.checkpoint, actor.device)
        resources.callback(stop_request.close)
        return Run(
            cfg=cfg,
            arch=arch,
            tokenizer=inputs.tokenizer,
            prompts=inputs.prompts,
            eval_items=inputs.eval_items,
            actor=actor,
            update=update,
            kl_reference=kl_reference,
            rollout=rollout,
            scorer=scorer,
            train_checkpoints=train_checkpoints,
            stop_request=stop_request,
            resources=resources.pop_all(),
        )
