"""The batch the actor trains on: right-padded token rows with per-token masks and targets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class PolicyBatch:
    """``N`` sequences of up to ``S`` tokens; every per-token tensor is aligned with ``tokens``.

    ``response_mask[i, t]`` is true when token ``t`` of row ``i`` was sampled by the policy;
    log-prob tensors hold ``log p(tokens[i, t] | tokens[i, :t])`` at ``[i, t]`` (0 elsewhere).
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    """[N]: one advantage per sequence, broadcast to its response tokens."""
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    rollout_weights: torch.Tensor | None = None
    """Rollout-correction weights of the policy-gradient term (``algorithm.rollout_correction``)."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [N, S], got shape {tuple(self.tokens.shape)}")
        n, s = self.tokens.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "tokens":
                continue
            expected = (n,) if f.name == "advantages" else (n, s)
            if tuple(value.shape) != expected:
                raise ValueError(f"{f.name} must have shape {expected}, got {tuple(value.shape)}")
        if bool(self.response_mask[:, 0].any()):
            raise ValueError("response_mask marks token 0 of a row: a response needs a prompt")
        if self.advantages is not None and not bool(torch.isfinite(self.advantages).all()):
            raise ValueError("advantages contain NaN or inf")

    @property
    def num_sequences(self) -> int:
        return self.tokens.size(0)

    @property
    def seq_length(self) -> int:
        return self.tokens.size(1)

    def rows(self, start: int, stop: int) -> PolicyBatch:
        """The sequences ``start:stop`` (views, no copies)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[start:stop]
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )

    def padded_to(self, multiple: int) -> PolicyBatch:
        """Right-pad the sequence dimension to a multiple (sequence parallelism: S % TP == 0)."""
        extra = -self.seq_length % multiple
        if extra == 0:
            return self
        pads = {
            f.name: torch.nn.functional.pad(getattr(self, f.name), (0, extra))
            for f in fields(self)
            if f.name != "advantages" and getattr(self, f.name) is not None
        }
        return replace(self, **pads)
