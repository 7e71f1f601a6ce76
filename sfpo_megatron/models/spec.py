"""Transformer layer specs: Transformer Engine's when it imports on a GPU, else Megatron's
modules with torch's fused attention and RMSNorm (``sdpa``) or Megatron's own attention
(``local``); ``model.attention`` chooses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from sfpo_megatron.models.arch import ModelArch


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back, as the HF Qwen/Llama reference does.

    Used instead of Megatron's torch-norm wrapper, which refuses sequence parallelism without
    Apex; the weight carries ``sequence_parallel`` so Megatron all-reduces its gradient
    across TP when SP splits the sequence.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(
                hidden_size,
                dtype=config.params_dtype,
                device="cpu" if config.use_cpu_initialization else None,
            )
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class FusedRMSNorm(RMSNorm):
    """:class:`RMSNorm` with the normalisation in one ``F.rms_norm`` call, which torch runs
    as a fused kernel where it has one (CUDA), accumulating in fp32 and rounding once.

    The weight is applied after that rounding, as :class:`RMSNorm` and transformers do (the
    embedded rollout engine computes the same values): bit-equal to :class:`RMSNorm` on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


def have_transformer_engine() -> bool:
    """True when TE imports cleanly; a broken TE install must not break the actor."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def megatron_block_spec(arch: ModelArch, num_layers: int, attention: Literal["sdpa", "local"]):
    """Megatron-Core's layer with this project's norms (works on CPU and GPU): ``sdpa`` =
    :class:`SDPAttention` and :class:`FusedRMSNorm`, ``local`` = Megatron's
    ``DotProductAttention`` and the reference :class:`RMSNorm`."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from sfpo_megatron.models.sdpa import SDPAttention

    if attention == "sdpa":
        core_attention, norm = SDPAttention, FusedRMSNorm
    else:
        core_attention, norm = DotProductAttention, RMSNorm
    qk_norm = norm if arch.qk_norm else IdentityOp
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def te_layer_spec(arch: ModelArch):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)


def block_spec(arch: ModelArch, config, vp_stage: int | None, attention: str = "auto"):
    """The spec for one model chunk; ``attention`` is ``model.attention`` (``auto`` takes
    Transformer Engine's when usable, i.e. on a GPU with TE importable, else ``sdpa``)."""
    if attention not in ("auto", "sdpa", "local"):
        raise ValueError(f"attention={attention!r} must be 'auto', 'sdpa' or 'local'")
    if attention == "auto" and torch.cuda.is_available() and have_transformer_engine():
        return te_layer_spec(arch)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return megatron_block_spec(arch, num_layers, "local" if attention == "local" else "sdpa")
