"""Stopping a run early without losing work: a signal (``checkpoint.stop_signals``) or a stop
file (``checkpoint.stop_file``) asks the trainer to finish the current iteration, save its
checkpoint and exit with :data:`EXIT_STATUS`, so that a job about to hit its time limit or be
preempted resumes where it stopped instead of at its last interval checkpoint.

Every rank acts at the same iteration boundary: one small all-reduce per iteration tells all
ranks whether any of them was signalled or rank 0 found the stop file, so no rank saves alone
or waits for the others in a collective they never enter.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from sfpo_megatron.config import CheckpointConfig, stop_signal

log = logging.getLogger(__name__)

EXIT_STATUS = 75
"""The exit status of a run stopped on request: EX_TEMPFAIL, "stopped early, try again" (it
resumes from the checkpoint it printed with ``checkpoint.resume=auto``)."""


class StopRequested(Exception):
    """Raised on every rank once a run has stopped on request (its checkpoint complete)."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"stopped on request after iteration {iteration}")
        self.iteration = iteration


class StopRequest:
    """A run's stop request: handlers for the stop signals on every rank (they only set a
    flag, read at the next iteration boundary) and the stop file, polled by rank 0."""

    def __init__(self, checkpoint: CheckpointConfig, device: torch.device) -> None:
        self.rank0 = dist.get_rank() == 0
        self.path = checkpoint.stop_path if self.rank0 else None
        if self.path is not None:  # so that it can be created before the first checkpoint
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._device = device
        self._signalled = False
        self._previous: dict[signal.Signals, Any] = {}
        for number in {stop_signal(name) for name in checkpoint.stop_signals}:
            self._previous[number] = signal.signal(number, self._on_signal)
            # Restart system calls the signal interrupts: C++ threads (gloo, NCCL) do not
            # expect EINTR.
            signal.siginterrupt(number, False)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self._signalled = True

    def agreed(self) -> bool:
        """Collective over all ranks: whether a stop was asked for on any of them."""
        asked = self._signalled or (self.path is not None and self.path.exists())
        flag = torch.tensor([int(asked)], dtype=torch.int32, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def forget(self) -> None:
        """Rank 0: remove the stop file, acted on, so that the next run does not stop at once."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def end_run(self, iteration: int, total: int, saved: Path | None) -> NoReturn:
        """After the checkpoint of ``iteration`` (``saved``; None without ``checkpoint.dir``)
        is complete: forget the request, say how to go on, raise StopRequested."""
        self.forget()
        where = (
            f"checkpoint {saved} is complete; continue with checkpoint.resume=auto"
            if saved is not None
            else "nothing was saved (no checkpoint.dir)"
        )
        log.info(
            "stopped on request after iteration %d of %d: %s (exit status %d)",
            iteration,
            total,
            where,
            EXIT_STATUS,
        )
        raise StopRequested(iteration)

    def close(self) -> None:
        """Give the stop signals back to the handlers they had before the run."""
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
