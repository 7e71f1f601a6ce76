"""The reference policy for the KL term, kept as a pinned host copy of this rank's model
params and swapped into the actor for its forward pass, so no second model occupies the
accelerator."""

from __future__ import annotations

import torch

from sfpo_megatron.batch import PolicyBatch


class ReferencePolicy:
    """Frozen copy of the actor's weights as they are when this is constructed."""

    def __init__(self, actor) -> None:
        self.actor = actor
        self.params = [param for chunk in actor.chunks for param in chunk.parameters()]
        pin = self.params[0].device.type == "cuda"
        self.frozen = [p.detach().to("cpu", copy=True) for p in self.params]
        self.stash = [torch.empty_like(f) for f in self.frozen]
        if pin:
            self.frozen = [f.pin_memory() for f in self.frozen]
            self.stash = [s.pin_memory() for s in self.stash]

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
