"""Hugging Face ``config.json`` -> :class:`ModelArch`, the one description of a model's shape.

One row per supported family in :data:`FAMILIES`; anything else is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    qkv_bias_key: str | None
    """HF key that switches q/k/v biases on; None = the family always has them (Qwen2)."""
    qk_norm: bool


FAMILIES: dict[str, Family] = {
    "qwen2": Family(qkv_bias_key=None, qk_norm=False),
    "qwen3": Family(qkv_bias_key="attention_bias", qk_norm=True),
    "llama": Family(qkv_bias_key="attention_bias", qk_norm=False),
}


@dataclass(frozen=True)
class RopeScaling:
    kind: str
    """"linear" or "llama3"."""
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    attention_dropout: float
    init_std: float


class UnsupportedModelError(ValueError):
    """The HF config describes a model this project cannot build."""


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(scaling["factor"]),
            float(scaling.get("low_freq_factor", 1.0)),
            float(scaling.get("high_freq_factor", 4.0)),
            int(scaling.get("original_max_position_embeddings", 8192)),
        )
    raise UnsupportedModelError(
        f"rope_scaling type {kind!r} is not supported (default, linear, llama3)"
    )


def hf_directory(path: str | Path) -> Path:
    """The checkpoint directory of ``model.hf_config`` (a directory or its config.json)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_hf_config(path: str | Path) -> ModelArch:
    """Parse a HF ``config.json`` (or a directory holding one) of a supported family."""
    path = hf_directory(path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    cfg = json.loads(path.read_text())
    return arch_from_hf_dict(cfg)


def arch_from_hf_dict(cfg: dict[str, Any]) -> ModelArch:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[model_type]
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("use_sliding_window=true is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    qkv_bias = True if family.qkv_bias_key is None else bool(cfg.get(family.qkv_bias_key, False))
    if model_type == "llama" and cfg.get("mlp_bias"):
        raise UnsupportedModelError("llama mlp_bias=true is not supported")
    return ModelArch(
        model_type=model_type,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family.qk_norm,
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


def padded_vocab_size(vocab_size: int, pad_multiple: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up so every TP rank holds an equal, aligned slice."""
    multiple = pad_multiple * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:  # noqa: F821
    """Inverse RoPE frequencies, with the family's scaling, as transformers computes them."""
    import torch

    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
