"""``sfpo-megatron export-hf``: load the configured model through Megatron (resharded to the
configured layout) and write it back as a HF checkpoint."""

from __future__ import annotations

import logging
from dataclasses import replace

from sfpo_megatron.config import Config
from sfpo_megatron.hf.export import save_hf, source_dtype
from sfpo_megatron.hf.load import load_hf_weights
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.training.preflight import launch_checked

log = logging.getLogger(__name__)


def export_hf(cfg: Config, out: str, dtype: str | None = None) -> str:
    """Write the configured model as a HF checkpoint at ``out`` in ``dtype``; None = the source
    checkpoint's dtype (see :func:`source_dtype`), else ``model.dtype``. Returns the dtype
    written."""
    arch, hf_weights = launch_checked(cfg)
    try:
        source = hf_directory(cfg.model.hf_config)
        dtype = dtype or source_dtype(source, hf_weights) or cfg.model.dtype
        chunks = build_model(replace(cfg, model=replace(cfg.model, dtype=dtype)), arch)
        if hf_weights is not None:
            load_hf_weights(chunks, arch, hf_weights)
        save_hf(chunks, arch, source, out, cfg.checkpoint.export_shard_mb)
        log.info("wrote %s (%s)", out, dtype)
        return dtype
    finally:
        shutdown()
