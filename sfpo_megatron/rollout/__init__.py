"""Rollout engines (embedded, SGLang client, server pool, launcher, HTTP server) and the
scoring of their samples. Their interface lives in :mod:`sfpo_megatron.common.samples` and is
re-exported here; engines are imported from their modules, so that using the interface does not
import transformers."""

from sfpo_megatron.common.samples import NO_WEIGHTS, RolloutEngine, Sample, SamplingParams

__all__ = ["NO_WEIGHTS", "RolloutEngine", "Sample", "SamplingParams"]
