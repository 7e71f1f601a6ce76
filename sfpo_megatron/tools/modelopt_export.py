"""``export-hf --quantize fp8``: Model Optimizer's FP8 recipe (``FP8_DEFAULT_CFG``: per-tensor
e4m3 weights, static activation scales calibrated on prompts) and its unified HF export, a
checkpoint SGLang serves with ``--quantization modelopt_fp8``.

nvidia-modelopt is the optional extra ``.[fp8]``; only this module imports it, when asked to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import Config
from sfpo_megatron.data.prompts import chat_template_encoder, load_prompts, load_tokenizer
from sfpo_megatron.models.arch import hf_directory

CALIBRATION_PROMPTS = 64
"""Prompts of ``data.train_files`` (the first ones) the activation scales are calibrated on."""


def calibration_prompts(cfg: Config) -> list[list[int]]:
    """Token ids of the first :data:`CALIBRATION_PROMPTS` training prompts, as training
    encodes them."""
    d = cfg.data
    if not d.train_files:
        raise ConfigError("export-hf --quantize fp8 calibrates on data.train_files: set it")
    records, _ = load_prompts(
        d.train_files, d.prompt_key, d.answer_key, d.source_key, d.skip_malformed, False
    )
    tokenizer = load_tokenizer(d.tokenizer or str(hf_directory(cfg.model.hf_config)))
    encode = chat_template_encoder(tokenizer, d.use_chat_template)
    return [encode(record) for record in records[:CALIBRATION_PROMPTS]]


def require_modelopt() -> None:
    """Raise ConfigError unless Model Optimizer imports (checked before any work)."""
    try:
        import modelopt.torch.export  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"export-hf --quantize fp8 needs NVIDIA Model Optimizer: pip install '.[fp8]' ({error})"
        ) from None


def quantize_checkpoint(source: Path, out: Path, prompts: list[list[int]]) -> None:
    """Quantize the HF checkpoint ``source`` with Model Optimizer's FP8 recipe, calibrated on
    ``prompts``, and write its unified HF export (plus ``source``'s tokenizer files) to
    ``out``."""
    require_modelopt()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    # The export reads the architecture list, which a config written by hand may lack.
    model.config.architectures = model.config.architectures or [type(model).__name__]

    def calibrate(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in prompts:
                module(torch.tensor([ids], device=module.device))

    model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, calibrate)
    export_hf_checkpoint(model, export_dir=out)
    for path in source.iterdir():
        if path.is_file() and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
