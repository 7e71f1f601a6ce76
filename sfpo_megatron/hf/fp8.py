"""FP8 (e4m3) rollout weights in SGLang's ``fp8`` block format: each linear weight of the
decoder layers becomes ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` beside it, one
scale per 128x128 block (``[ceil(out/128), ceil(in/128)]``), ``w ~ q * scale_inv``.

Embeddings, lm_head, norms and biases stay in high precision, as SGLang keeps them. A scale is
``amax(|block|) / 448``, the recipe of Model Optimizer's ``FP8QTensor`` (its QDQ reference).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
}
"""What a served config.json says so that SGLang loads the weights as fp8 blocks."""


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether ``name`` is a linear weight of a decoder layer (the weights fp8 covers)."""
    return name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def _blocks(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def quantize_fp8(
    weight: torch.Tensor, block: tuple[int, int] = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (e4m3 weight [out, in], float32 scale_inv per block). Edge
    blocks of shapes that are not multiples of ``block`` are partial (zero-padded for the
    amax); an all-zero block gets scale 1. ``block=(1, in)`` gives per-channel scales."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = _blocks(rows, cols, block)
    whole = weight.float()
    padded = whole
    if (nr * br, nc * bc) != (rows, cols):
        padded = whole.new_zeros(nr * br, nc * bc)
        padded[:rows, :cols] = whole
    tiles = padded.view(nr, br, nc, bc)
    # max |x| as max(max x, -min x): one pass less than abs() (same value, bit for bit)
    amax = torch.maximum(tiles.amax(dim=3).amax(dim=1), tiles.amin(dim=3).amin(dim=1).neg())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # |x| / scale <= 448 up to one rounding, which e4m3's round-to-nearest brings back to 448.
    quantized = (tiles / scale[:, None, :, None]).to(FP8_DTYPE).view(nr * br, nc * bc)
    if padded is not whole:
        quantized = quantized[:rows, :cols].contiguous()
    return quantized, scale


def dequantize_fp8(
    quantized: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] = BLOCK,
) -> torch.Tensor:
    """The inverse of :func:`quantize_fp8` up to e4m3 rounding."""
    rows, cols = quantized.shape
    nr, nc = scale_inv.shape
    br, bc = block
    if _blocks(rows, cols, block) != (nr, nc):
        raise ValueError(f"scale shape {(nr, nc)} does not tile a weight of shape {(rows, cols)}")
    full = scale_inv.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return (quantized.float() * full).to(dtype)


def quantize_tensor(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One export-stream tensor as fp8 rollout weights: the weight and its scale, or the
    tensor unchanged where fp8 does not apply."""
    if not is_fp8_weight(name, tensor):
        return [(name, tensor)]
    quantized, scale = quantize_fp8(tensor)
    return [(name, quantized), (scale_name(name), scale)]


def dequantize_bucket(
    bucket: list[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """A bucket with every fp8 weight (and its scale, which travels in the same bucket)
    replaced by the weight in ``dtype``, dequantized on ``device`` (None: where it is, so only
    fp8 bytes cross to the engine's device); other tensors pass through."""
    scales = {name: t for name, t in bucket if name.endswith(SCALE_SUFFIX)}
    out = []
    for name, tensor in bucket:
        if name in scales:
            continue
        if tensor.dtype == FP8_DTYPE:
            scale = scales.get(scale_name(name))
            if scale is None:
                raise ValueError(f"fp8 weight {name} arrived without {scale_name(name)}")
            tensor = dequantize_fp8(tensor.to(device), scale.to(device), dtype)
        out.append((name, tensor))
    orphans = sorted(n for n in scales if n.removesuffix(SCALE_SUFFIX) not in dict(bucket))
    if orphans:
        raise ValueError(f"fp8 scales without their weights: {orphans}")
    return out
