"""``sfpo-megatron export-hf``: load the configured model through Megatron (resharded to the
configured layout) and write it back as a HF checkpoint; with ``--quantize fp8``, quantized
by Model Optimizer (:mod:`~sfpo_megatron.tools.modelopt_export`)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from sfpo_megatron.config import Config
from sfpo_megatron.hf.export import save_hf, source_dtype
from sfpo_megatron.hf.load import load_hf_weights
from sfpo_megatron.launch.parallel import shutdown
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.tools.modelopt_export import (
    calibration_prompts,
    quantize_checkpoint,
    require_modelopt,
)
from sfpo_megatron.training.preflight import launch_checked

log = logging.getLogger(__name__)


def export_hf(cfg: Config, out: str, dtype: str | None = None, quantize: str | None = None) -> str:
    """Write the configured model as a HF checkpoint at ``out`` in ``dtype``; None = the source
    checkpoint's dtype (see :func:`source_dtype`), else ``model.dtype``. ``quantize="fp8"``:
    that checkpoint (kept nowhere) quantized by Model Optimizer, calibrated on the first
    training prompts. Returns the dtype written (of the unquantized tensors)."""
    prompts = None
    if quantize == "fp8":
        require_modelopt()
        prompts = calibration_prompts(cfg)
    arch, hf_weights = launch_checked(cfg)
    try:
        source = hf_directory(cfg.model.hf_config)
        dtype = dtype or source_dtype(source, hf_weights) or cfg.model.dtype
        chunks = build_model(replace(cfg, model=replace(cfg.model, dtype=dtype)), arch)
        if hf_weights is not None:
            load_hf_weights(chunks, arch, hf_weights)
        if prompts is None:
            save_hf(chunks, arch, source, out, cfg.checkpoint.export_shard_mb)
        else:
            _save_quantized(
                chunks, arch, source, Path(out), cfg.checkpoint.export_shard_mb, prompts
            )
        log.info("wrote %s (%s%s)", out, dtype, ", fp8 by Model Optimizer" if prompts else "")
        return dtype
    finally:
        shutdown()


def _save_quantized(
    chunks: list, arch, source: Path, out: Path, shard_mb: float, prompts: list[list[int]]
) -> None:
    """save_hf into a staging directory, quantized from there by global rank 0 into ``out``
    (replaced only once complete)."""
    staging = out.with_name(out.name + ".unquantized")
    save_hf(chunks, arch, source, staging, shard_mb)
    if dist.get_rank() == 0:
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            quantize_checkpoint(staging, partial, prompts)
            shutil.rmtree(out, ignore_errors=True)
            partial.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
