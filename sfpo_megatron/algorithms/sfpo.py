"""The SFPO update (shared/SFPO_SPEC.md): snapshot theta0 -> K fast training passes on the same
batch -> reposition theta = theta0 + alpha (thetaK - theta0) in the optimizer's fp32 master
shard -> one slow pass; the entropy switch (:mod:`~sfpo_megatron.algorithms.switch`) turns it
into plain GRPO for good.

Memory: one flat fp32 snapshot of this rank's master-weight shard, on the device or in
pinned host memory; the reposition works in place and writes the model params in the same
pass. Optimizer state and the LR schedule are never touched here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from sfpo_megatron import ops
from sfpo_megatron.algorithms.switch import EntropySwitch
from sfpo_megatron.algorithms.update import UpdateResult
from sfpo_megatron.config import SFPOConfig
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.policy.optim import MasterWeights

_log = logging.getLogger(__name__)


class Snapshot:
    """theta0 of this rank's master-weight shard, in one flat fp32 buffer allocated once.

    On a GPU with ``placement="host"`` the buffer is pinned host memory and the copy runs on a
    side stream that the fast passes overlap; :meth:`wait` makes the compute stream wait for it
    before the first optimizer step may change the master weights.
    """

    def __init__(self, weights: MasterWeights, placement: str) -> None:
        self.weights = weights
        self.placement = placement
        self.buffer: torch.Tensor | None = None
        self._side: torch.cuda.Stream | None = None
        self._copied: torch.cuda.Event | None = None

    def _allocate(self) -> torch.Tensor:
        device = self.weights.mains[0].device
        if self.placement == "host" and device.type == "cuda":
            return torch.empty(self.weights.numel, dtype=torch.float32, pin_memory=True)
        return torch.empty(self.weights.numel, dtype=torch.float32, device=device)

    def capture(self) -> None:
        if self.buffer is None:
            self.buffer = self._allocate()
        mains = self.weights.mains
        if self.buffer.device == mains[0].device:
            ops.snapshot_(mains, self.buffer)
            return
        self._side = self._side or torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            ops.snapshot_(mains, self.buffer)
            self._copied = torch.cuda.Event()
            self._copied.record()

    @property
    def overlapped(self) -> bool:
        """The copy runs beside the fast passes (host buffer on a GPU): not timed on its own."""
        return self._side is not None

    def wait(self) -> None:
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def reposition_(self, alpha: float) -> None:
        """master = snap + alpha (master - snap), model-param slices written in the same pass."""
        self.wait()
        w, split = self.weights, sum(t.numel() for t in self.weights.paired)
        parts = [(w.paired, self.buffer[:split], w.models), (w.alone, self.buffer[split:], None)]
        for mains, flat, models in parts:
            if not mains:
                continue
            if flat.device == mains[0].device:
                ops.reposition_(mains, ops.snapshot_views(flat, mains), models, alpha)
            else:
                ops.reposition_from_host_(mains, flat, models, alpha)


def _clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class SFPOUpdate:
    """One SFPO iteration per call on an :class:`~sfpo_megatron.policy.actor.Actor`."""

    def __init__(self, actor, cfg: SFPOConfig) -> None:
        self.actor, self.cfg = actor, cfg
        self.snapshot = Snapshot(actor.master_weights(), cfg.snapshot)
        self.switch = EntropySwitch(cfg) if cfg.switch_to_grpo else None

    @property
    def switched(self) -> bool:
        return self.switch is not None and self.switch.switched

    def step(self, batch: PolicyBatch) -> UpdateResult:
        """Fast passes, reposition, slow pass (or one GRPO pass once switched); the metrics
        are the slow pass's, plus phase timings and the entropy z-score."""
        slow_fast = not self.switched
        timings: dict[str, float] = {}
        if slow_fast:
            start = _clock()
            self.snapshot.capture()
            if not self.snapshot.overlapped:
                timings["time_snapshot"] = _clock() - start
            fast_steps = 0
            for _ in range(self.cfg.inner_steps):
                fast_steps += self.actor.train_pass(batch, before_step=self.snapshot.wait)[
                    "optimizer_steps"
                ]
            repositioned = _clock()
            self.snapshot.reposition_(self.cfg.alpha)
            self.actor.publish_master_weights()
            slow = _clock()
            timings.update(time_fast=repositioned - start, time_reposition=slow - repositioned)
        else:
            fast_steps, slow = 0, _clock()
        metrics = self.actor.train_pass(batch)
        metrics.update(
            timings,
            time_slow=_clock() - slow,
            fast_optimizer_steps=fast_steps,
            sfpo_active=float(slow_fast),
        )
        if self.switch is not None:
            z = self.switch.observe(metrics["entropy"])
            if z is not None:
                metrics["entropy_z"] = z
            if slow_fast and self.switched:  # fired on this step's entropy
                _log_switch(z, self.cfg.tau)
        alpha = self.cfg.alpha if slow_fast else 0.0
        return UpdateResult(metrics, alpha=alpha, slow_fast=slow_fast, switched=self.switched)

    def state_dict(self) -> dict[str, Any]:
        return {"switch": None if self.switch is None else self.switch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.switch is not None and state["switch"] is not None:
            self.switch.load_state_dict(state["switch"])


def _log_switch(z: float, tau: float) -> None:
    """Once, on global rank 0: every rank's switch fires at the same iteration."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        _log.warning(
            "entropy z-score %.2f crossed tau=%.2f: SFPO stops, plain GRPO from the next "
            "iteration on",
            z,
            tau,
        )
