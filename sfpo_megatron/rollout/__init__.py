"""Rollout engines: the interface the trainer samples through (here) and the engines
(``rollout.embedded``: in-process transformers), imported from their modules so that using
the interface does not import transformers."""

from sfpo_megatron.rollout.base import NO_WEIGHTS, RolloutEngine, Sample, SamplingParams

__all__ = ["NO_WEIGHTS", "RolloutEngine", "Sample", "SamplingParams"]
