"""HF config parsing per family, refusals by name, RoPE frequencies as transformers has them."""

from __future__ import annotations

import json

import pytest
import torch

from sfpo_megatron.models.arch import (
    UnsupportedModelError,
    padded_vocab_size,
    read_hf_config,
    rope_inv_freq,
)

from conftest import write_hf_config


def test_families(tmp_path):
    qwen2 = read_hf_config(write_hf_config(tmp_path / "a", "qwen2"))
    assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (True, False, False)
    qwen3 = read_hf_config(write_hf_config(tmp_path / "b", "qwen3"))
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 8)
    llama = read_hf_config(write_hf_config(tmp_path / "c", "llama"))
    assert (llama.qkv_bias, llama.num_query_groups, llama.head_dim) == (False, 2, 8)
    assert llama.rope_theta == 50000.0


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="'mamba'.*qwen2, qwen3, llama"):
        read_hf_config(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_rope_inv_freq_matches_transformers(tmp_path, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 50000.0, **scaling}
    directory = write_hf_config(
        tmp_path, "llama", rope_parameters=params, max_position_embeddings=512
    )
    ours = rope_inv_freq(read_hf_config(directory))
    theirs, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](
        LlamaConfig.from_pretrained(directory), "cpu"
    )
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


def test_vocab_padding():
    assert padded_vocab_size(300, 128, 1) == 384
    assert padded_vocab_size(300, 128, 2) == 512
    assert padded_vocab_size(512, 128, 2) == 512
