"""Our fp8 quantizer against Model Optimizer's FP8 QDQ reference, and ``export-hf --quantize
fp8`` (its FP8 recipe and unified HF export); both run where nvidia-modelopt is installed
(``.[fp8]``), the clear error where it is not. Imports nothing that needs Megatron."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sfpo_megatron.hf.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from sfpo_megatron.tools.modelopt_export import quantize_checkpoint

from conftest import REPO, save_random_hf_model

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
SHAPES = [(128, 128), (256, 384), (200, 70), (1, 300), (257, 129)]
"""Weight shapes of the quantizer tests: whole blocks, and partial ones at the edges."""


def random_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """bf16-representable fp32 values of a typical linear weight's scale."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).bfloat16().float()


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt is not installed (.[fp8])")
def test_matches_model_optimizer_fp8_reference_bit_for_bit():
    from modelopt.torch.quantization import qtensor

    for shape in SHAPES:
        w = random_weight(shape, seed=1)
        q, scale = quantize_fp8(w)
        ref, ref_scale = qtensor.FP8QTensor.quantize(w, block_sizes={-1: 128, -2: 128})
        assert torch.equal(scale, ref_scale), shape
        assert torch.equal(q.view(torch.uint8), ref._quantized_data.view(torch.uint8)), shape
        back = ref.dequantize(torch.float32, scale=ref_scale, block_sizes={-1: 128, -2: 128})
        assert torch.equal(dequantize_fp8(q, scale), back), shape


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt is not installed (.[fp8])")
def test_modelopt_fp8_export_is_our_quantizer_per_tensor(tmp_path):
    """Its per-tensor e4m3 weights are, bit for bit, our quantizer with one block per tensor;
    the config says what SGLang's modelopt_fp8 loader reads."""
    save_random_hf_model(tmp_path / "src", "qwen2", std=0.02)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", [[1, 2, 3], [4, 5, 6, 7, 8]])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "modelopt" and quant["quant_algo"] == "FP8"
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    source = load_file(tmp_path / "src" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    linear = [n for n in source if n.startswith("model.layers.") and source[n].dim() == 2]
    assert len(linear) == 4 * 7
    for name in linear:
        ours, scale = quantize_fp8(source[name], block=tuple(source[name].shape))
        assert exported[name].dtype == FP8_DTYPE
        assert torch.equal(exported[name].view(torch.uint8), ours.view(torch.uint8)), name
        assert exported[name + "_scale"].item() == scale.item(), name
        assert exported[name.removesuffix("weight") + "input_scale"].item() > 0, name
    assert exported["model.embed_tokens.weight"].dtype == torch.float32


def test_export_cli_without_modelopt_names_the_extra(tmp_path):
    """Without Model Optimizer (here a stand-in package that fails to import, whether or not
    it is installed) the export stops before any work, naming the extra."""
    from test_hf_checkpoint import export_cli

    absent = tmp_path / "absent" / "modelopt"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text("raise ImportError(\"No module named 'modelopt'\")\n")
    save_random_hf_model(tmp_path / "model", "qwen2")
    proc = export_cli(
        tmp_path / "model", tmp_path / "out", "--quantize", "fp8", path_before=[absent.parent]
    )
    assert proc.returncode == 2 and "pip install '.[fp8]'" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("out*"))


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt is not installed (.[fp8])")
def test_export_cli_quantize_fp8_of_the_demo(tmp_path):
    """Through Megatron and back, then Model Optimizer, calibrated on the demo's prompts (its
    config.json names no architecture: the export needs one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sfpo_megatron.cli", "export-hf"]
    command += [
        str(REPO / "examples/configs/demo.yaml"),
        str(tmp_path / "out"),
        "--quantize",
        "fp8",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging removed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported["model.layers.0.mlp.down_proj.weight"].dtype == FP8_DTYPE
    assert (tmp_path / "out" / "tokenizer.json").is_file()
