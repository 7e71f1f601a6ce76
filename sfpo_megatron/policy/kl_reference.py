"""The reference policy for the KL term, kept as a pinned host copy of this rank's model
params and swapped into the actor for its forward pass, so no second model occupies the
accelerator.

It is the policy RL starts from: the model as built (HF weights or the seeded random init),
or, after a warm start, the warm-started weights. A resumed run rebuilds the first; the
second only a checkpoint can give back, so checkpoints store it (:attr:`as_built` false).
"""

from __future__ import annotations

import torch

from sfpo_megatron.models.gpt import unwrap
from sfpo_megatron.models.sharding import sync_params
from sfpo_megatron.policy.batch import PolicyBatch


class ReferencePolicy:
    """Frozen copy of the actor's weights as they are when this is constructed (or when
    :meth:`capture` or :meth:`load` last replaced them)."""

    def __init__(self, actor) -> None:
        self.actor = actor
        # (chunk index, parameter name) of every param, in the order of ``params``.
        self.names = [
            (index, name)
            for index, chunk in enumerate(actor.chunks)
            for name, _ in unwrap(chunk).named_parameters()
        ]
        self.params = [p for chunk in actor.chunks for _, p in unwrap(chunk).named_parameters()]
        pin = self.params[0].device.type == "cuda"
        self.frozen = [torch.empty_like(p, device="cpu", pin_memory=pin) for p in self.params]
        self.stash = [torch.empty_like(f, pin_memory=pin) for f in self.frozen]
        self.as_built = True
        self._copy_current()

    @torch.no_grad()
    def _copy_current(self) -> None:
        sync_params(self.actor.chunks)  # an overlapped param all-gather still in flight
        for frozen, param in zip(self.frozen, self.params, strict=True):
            frozen.copy_(param)

    def capture(self) -> None:
        """Make the actor's current weights the reference (after the warm start)."""
        self._copy_current()
        self.as_built = False

    def by_name(self) -> list[dict[str, torch.Tensor]]:
        """Per model chunk, the frozen tensors by parameter name (what checkpoints store)."""
        chunks: list[dict[str, torch.Tensor]] = [{} for _ in self.actor.chunks]
        for (index, name), frozen in zip(self.names, self.frozen, strict=True):
            chunks[index][name] = frozen
        return chunks

    @torch.no_grad()
    def load(self, chunks: list[dict[str, torch.Tensor]]) -> None:
        """Take the reference from a checkpoint's tensors (:meth:`by_name`'s layout)."""
        for (index, name), frozen in zip(self.names, self.frozen, strict=True):
            frozen.copy_(chunks[index][name])
        self.as_built = False

    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """Per-token log-probs of ``batch`` under the reference weights (actor's layout)."""
        for param, stash, frozen in zip(self.params, self.stash, self.frozen, strict=True):
            stash.copy_(param)
            param.copy_(frozen, non_blocking=True)
        try:
            logprobs, _ = self.actor.forward_logprobs(batch)
        finally:
            for param, stash in zip(self.params, self.stash, strict=True):
                param.copy_(stash, non_blocking=True)
        return logprobs
