"""What every rollout engine offers the trainer, kept at the bottom because every layer passes
them on: sampling parameters, the samples an engine returns, the export stream's buckets, and
the engine protocol (generate, weight sync, memory hand-off)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Bucket = list[tuple[str, torch.Tensor]]
"""One piece of the export stream: (HF name, whole tensor) pairs."""

NO_WEIGHTS = -1
"""``weight_version()`` before the first ``update_weights``: no weights to sample from."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. Temperature must be positive (no greedy mode: ``top_k=1`` is greedy),
    because the log-probs reported are those of logits / temperature, as the actor uses."""

    n: int = 1
    """Samples per prompt (independent rows)."""
    temperature: float = 1.0
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 = off."""
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a sample (and are kept as its last token)."""
    seed: int | None = None
    """Same seed, prompts and weights -> same samples; None = nondeterministic."""

    def __post_init__(self) -> None:
        for name in ("n", "top_k", "max_new_tokens"):
            _require_int(name, getattr(self, name))
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (top_k=1 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        stops = tuple(self.stop_token_ids)
        for token in stops:
            _require_int("stop_token_ids", token)
            if token < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {stops}")
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None:
            _require_int("seed", self.seed)


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


@dataclass
class Sample:
    """One generated continuation, with the log-prob of each token under the weights of
    ``weight_version`` (log_softmax(logits / temperature) over the full vocabulary)."""

    prompt_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    weight_version: int


class RolloutEngine(Protocol):
    """A policy copy that samples; the trainer pushes new weights into it after each update."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major (all samples of prompt 0 first)."""
        ...

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Replace every weight from the export stream's buckets (HF names, whole tensors)."""
        ...

    def weight_version(self) -> int:
        """Version of the weights samples come from; ``NO_WEIGHTS`` before the first update."""
        ...

    def release_memory(self) -> None:
        """Free accelerator memory so training can use it (weights are kept elsewhere)."""
        ...

    def resume_memory(self) -> None:
        """Undo ``release_memory`` before generating again."""
        ...

    def health(self) -> bool:
        """True when the engine can serve samples (weights loaded)."""
        ...
