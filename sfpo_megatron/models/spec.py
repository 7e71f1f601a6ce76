"""Transformer layer specs: Transformer Engine's when it imports on a GPU, else the local one."""

from __future__ import annotations

import torch

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


def have_transformer_engine() -> bool:
    """True when TE imports cleanly; a broken TE install must not break the actor."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def local_block_spec(arch: ModelArch, num_layers: int):
    """Megatron-Core modules only, with this project's RMSNorm (works on CPU and GPU)."""
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

    qk_norm = RMSNorm if arch.qk_norm else IdentityOp
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)


def te_layer_spec(arch: ModelArch):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)


def block_spec(arch: ModelArch, config, vp_stage: int | None):
    """The spec for one model chunk: TE when usable (GPU + TE importable), else local."""
    if torch.cuda.is_available() and have_transformer_engine():
        return te_layer_spec(arch)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    return local_block_spec(arch, get_num_layers_to_build(config, vp_stage=vp_stage))
