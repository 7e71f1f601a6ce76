"""SFPO's entropy switch (shared/SFPO_SPEC.md): once ``window`` entropies exist,
Z = (H - mean) / (std + 1e-9) over the last ``window`` (current included, population std);
Z >= tau (or |Z| >= tau when two-sided) ends SFPO from the next iteration on, for good."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from sfpo_megatron.config import SFPOConfig


class EntropySwitch:
    """The z-score window and whether it has fired; it counts no iterations of its own."""

    def __init__(self, cfg: SFPOConfig) -> None:
        self.tau, self.one_sided = cfg.tau, cfg.one_sided
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.switched = False

    def observe(self, entropy: float) -> float | None:
        """Record one iteration's entropy; returns its z-score once the window is full."""
        if not math.isfinite(entropy):
            raise FloatingPointError(f"the slow pass's entropy is {entropy}")
        self.recent.append(entropy)
        if len(self.recent) < self.recent.maxlen:
            return None
        values = torch.tensor(list(self.recent), dtype=torch.float64)
        z = float((entropy - values.mean()) / (values.std(unbiased=False) + 1e-9))
        crossed = z >= self.tau if self.one_sided else abs(z) >= self.tau
        self.switched = self.switched or crossed
        return z

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "switched": self.switched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.switched = state["switched"]
