"""FP8 rollout weights: the block quantizer against e4m3's rounding and Model Optimizer's QDQ
reference, the export bucket pairing, and the embedded engine fed fp8 weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from sglang_schema import validate_request
from test_embedded_engine import export_buckets, reference_logprobs
from test_modelopt_export import SHAPES, random_weight

from sfpo_megatron.hf.export import write_served_fp8_model
from sfpo_megatron.hf.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_bucket,
    dequantize_fp8,
    quantize_fp8,
    quantize_tensor,
)
from sfpo_megatron.protocol.flat_bucket import flatten, total_bytes
from sfpo_megatron.rollout import SamplingParams
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.launcher import sglang_command
from sfpo_megatron.rollout.sglang_client import SGLangClient

from conftest import save_random_hf_model


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_weights_are_within_e4m3_rounding(shape):
    w = random_weight(shape)
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
    assert scale.dtype == torch.float32 and tuple(scale.shape) == blocks
    per_element = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative) down to 2^-6, subnormal steps of 2^-9 below.
    bound = torch.maximum(w.abs() * 2**-4, per_element * 2**-10)
    assert ((dequantize_fp8(q, scale) - w).abs() <= bound).all()
    # Every block's largest magnitude lands on e4m3's largest value, exactly.
    assert q.float().abs().max() == FP8_MAX


def test_zero_blocks_and_per_channel_scales():
    w = random_weight((130, 260))
    w[:128, :128] = 0
    q, scale = quantize_fp8(w)
    assert scale[0, 0] == 1 and (q[:128, :128].float() == 0).all()
    w[:128, :128] = 0.01
    q, scale = quantize_fp8(w, block=(1, 260))
    assert scale.shape == (130, 1)
    assert torch.equal(scale[:, 0], w.abs().amax(dim=1) / FP8_MAX)
    back = dequantize_fp8(q, scale, block=(1, 260))
    assert ((back - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_fp8(q, scale)


def test_only_decoder_linear_weights_are_quantized():
    linear = random_weight((64, 32))
    names = {
        "model.embed_tokens.weight": linear,
        "lm_head.weight": linear,
        "model.norm.weight": linear[0],
        "model.layers.0.input_layernorm.weight": linear[0],
        "model.layers.0.self_attn.q_proj.bias": linear[0],
        "model.layers.0.self_attn.q_proj.weight": linear,
    }
    out = {n: t for name, tensor in names.items() for n, t in quantize_tensor(name, tensor)}
    assert out.keys() == names.keys() | {"model.layers.0.self_attn.q_proj.weight_scale_inv"}
    assert [n for n, t in out.items() if t.dtype == FP8_DTYPE] == [
        "model.layers.0.self_attn.q_proj.weight"
    ]


def test_dequantize_bucket_pairs_weights_with_scales():
    w = random_weight((40, 50))
    bucket = [("norm", w[0]), *quantize_tensor("model.layers.1.mlp.up_proj.weight", w)]
    out = dict(dequantize_bucket(list(reversed(bucket)), torch.float32))
    assert out.keys() == {"norm", "model.layers.1.mlp.up_proj.weight"}
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], dequantize_fp8(*quantize_fp8(w)))
    with pytest.raises(ValueError, match="without model.layers.1.mlp.up_proj.weight_scale_inv"):
        dequantize_bucket(bucket[:2], torch.float32)
    with pytest.raises(ValueError, match="scales without their weights"):
        dequantize_bucket([bucket[0], bucket[2]], torch.float32)


FP8_LOGPROB_BOUND = 0.05
"""Max |log-prob gap| of the fp8 engine to the full-precision model, for the tiny model below
(weights N(0, 0.02); measured: mean 0.010, max 0.028). The gap grows with the logits' scale:
0.14 mean at std 0.1."""


def test_embedded_engine_on_fp8_weights(tmp_path):
    """The engine computes exactly with the dequantized weights (its fp32 CPU path), and its
    log-probs stay within the stated bound of the unquantized model's."""
    # Widths that are not multiples of 128: partial edge blocks in every linear weight.
    model = save_random_hf_model(
        tmp_path, "qwen2", std=0.02, hidden_size=160, intermediate_size=288
    ).eval()
    buckets = [
        [item for name, tensor in bucket for item in quantize_tensor(name, tensor)]
        for bucket in export_buckets(model)
    ]
    assert sum(t.dtype == FP8_DTYPE for b in buckets for _, t in b) == 4 * 7
    dequantized = copy.deepcopy(model)
    weights = dict(item for b in buckets for item in dequantize_bucket(b, torch.float32))
    dequantized.load_state_dict(weights)
    engine = EmbeddedEngine(tmp_path)
    engine.update_weights(buckets, version=1)
    params = SamplingParams(max_new_tokens=12, n=2, seed=3)
    to_dequantized, to_exact = [], []
    for sample in engine.generate([[1, 2, 3], [5, 6, 7, 8, 9]], params):
        logprobs = torch.tensor(sample.output_logprobs)
        to_dequantized.append(logprobs - reference_logprobs(dequantized, sample, 1.0))
        to_exact.append(logprobs - reference_logprobs(model, sample, 1.0))
    assert torch.cat(to_dequantized).abs().max() < 1e-4
    gap = torch.cat(to_exact).abs()
    assert 0 < gap.max() < FP8_LOGPROB_BOUND and gap.mean() < FP8_LOGPROB_BOUND / 2


# --- SGLang: the fp8 payloads and the served model -------------------------------------------

QWEN2_LAYER = {  # a Qwen2 layer of hidden 160, 4 heads / 2 KV heads of 40, MLP 288
    "model.embed_tokens.weight": (300, 160),
    "model.layers.0.input_layernorm.weight": (160,),
    "model.layers.0.self_attn.q_proj.weight": (160, 160),
    "model.layers.0.self_attn.q_proj.bias": (160,),
    "model.layers.0.self_attn.k_proj.weight": (80, 160),
    "model.layers.0.self_attn.o_proj.weight": (160, 160),
    "model.layers.0.mlp.gate_proj.weight": (288, 160),
    "model.layers.0.mlp.down_proj.weight": (160, 288),
    "model.norm.weight": (160,),
    "lm_head.weight": (300, 160),
}


def test_fp8_bucket_payload_fits_sglang_0_5_23_and_its_block_loader(monkeypatch):
    bucket = [
        item
        for name, shape in QWEN2_LAYER.items()
        for item in quantize_tensor(name, torch.randn(shape).bfloat16())
    ]
    flat = flatten(bucket)
    sent = {}
    monkeypatch.setattr(
        SGLangClient, "_control", lambda self, path, body: sent.update({path: body})
    )
    client = SGLangClient("http://127.0.0.1:1", 1.0)
    client.update_weights_from_distributed(flat.names, flat.dtypes, flat.shapes, "sfpo_pp0", "1")
    payload = sent["/update_weights_from_distributed"]
    validate_request("/update_weights_from_distributed", payload)
    assert total_bytes(payload["dtypes"], payload["shapes"]) == flat.buffer.numel()  # aligned
    layout = zip(payload["dtypes"], payload["shapes"], strict=True)
    meta = dict(zip(payload["names"], layout, strict=True))
    # What sglang's Fp8LinearMethod (block quant) creates: an e4m3 weight, a float32
    # weight_scale_inv of [ceil(out / 128), ceil(in / 128)]; the rest stays bf16, unscaled.
    for name, shape in QWEN2_LAYER.items():
        scale = meta.get(name + "_scale_inv")
        if name.startswith("model.layers.") and len(shape) == 2:
            assert meta[name] == ("float8_e4m3fn", list(shape))
            assert scale == ("float32", [-(-shape[0] // 128), -(-shape[1] // 128)])
        else:
            assert meta[name] == ("bfloat16", list(shape)) and scale is None
    assert len(meta) == len(QWEN2_LAYER) + 5


def test_served_fp8_model_and_launch_flags(tmp_path):
    save_random_hf_model(tmp_path / "src", "qwen2")
    served = write_served_fp8_model(tmp_path / "src", tmp_path / "served")
    config = json.loads((served / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    assert (served / "tokenizer_config.json").is_file()
    assert not list(served.glob("*.safetensors"))
    command = sglang_command(str(served), 30001, weight_format="fp8")
    assert command[command.index("--quantization") + 1] == "fp8"
    assert command[command.index("--load-format") + 1] == "dummy"
    assert "--quantization" not in sglang_command(str(served), 30001)
