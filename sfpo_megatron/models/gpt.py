"""Build the actor: Megatron-Core GPTModel chunks (one per virtual pipeline stage), wrapped
in Float16Module and DistributedDataParallel exactly as Megatron-LM wraps them."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from sfpo_megatron.config import Config
from sfpo_megatron.models.arch import ModelArch, padded_vocab_size, rope_inv_freq
from sfpo_megatron.models.spec import block_spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_config(cfg: Config, arch: ModelArch) -> TransformerConfig:
    """Megatron's TransformerConfig for this model and layout (fusions only on CUDA)."""
    p = cfg.parallel
    dtype = DTYPES[cfg.model.dtype]
    cuda = torch.cuda.is_available()
    recompute = (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if cfg.model.recompute_activations
        else {}
    )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=True,
        # gloo pairs a peer's sends and receives in posting order; the batched p2p op posts
        # activations and gradients between two ranks in opposite orders (PP=2 + VPP) and
        # mixes them up. The unbatched path orders them by rank parity.
        batch_p2p_comm=cuda,
        **recompute,
    )


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, the TP RNG tracker forked from it."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(cfg: Config, arch: ModelArch) -> list[DistributedDataParallel]:
    """The model chunks of this rank, ready for Megatron's schedules and optimizer."""
    set_seed(cfg.model.seed)
    config = transformer_config(cfg, arch)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.vocab_pad_multiple, cfg.parallel.tensor)
    chunks: list[torch.nn.Module] = []
    for stage in range(cfg.parallel.model_chunks):
        vp_stage = stage if cfg.parallel.interleaved else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(arch, config, vp_stage, cfg.model.attention),
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp_stage,
        )
        model.model_type = ModelType.encoder_or_decoder
        # Megatron's built-in scaling hard-codes Llama 3.1's constants; use the config's own.
        model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if config.fp16 or config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside the DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk
