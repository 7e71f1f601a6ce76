"""The ``model`` and ``parallel`` sections: what to build, and how it is laid out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sfpo_megatron.config.checks import at_least, require


@dataclass
class ModelConfig:
    hf_config: str = ""
    """Path to a Hugging Face checkpoint directory (or its ``config.json``)."""
    load_weights: bool = True
    """Import the directory's safetensors weights; false = random init from the config."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Parameter dtype; bf16/fp16 keep fp32 main params in the optimizer."""
    attention: Literal["auto", "sdpa", "local"] = "auto"
    """Layer spec: ``sdpa`` = torch's fused scaled_dot_product_attention and RMSNorm (never
    materialises the S x S scores); ``local`` = Megatron's DotProductAttention (materialises
    them; kept as a reference); ``auto`` = Transformer Engine's spec when TE imports on a
    GPU, else ``sdpa``."""
    seed: int = 1234
    """Initialisation and dropout seed (Megatron-LM's: + 100 x the pipeline rank)."""
    vocab_pad_multiple: int = 128
    """The vocabulary is padded to a multiple of this x TP, as Megatron-LM does."""
    recompute_activations: bool = False

    def validate(self) -> None:
        require(bool(self.hf_config), "model.hf_config must name a Hugging Face config.json")
        at_least("model.seed", self.seed, 0)
        at_least("model.vocab_pad_multiple", self.vocab_pad_multiple, 1)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved schedule); None = 1 chunk."""
    data: int | None = None
    """Data-parallel size; None = world size / (tensor x pipeline)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    timeout_s: int = 600
    """Collective timeout: a dead rank makes the others fail after this long."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """"nccl" needs CUDA; "gloo" forces CPU mode (Megatron's CUDA calls patched onto the CPU,
    refused where CUDA works); "auto" = nccl with CUDA, gloo only on a machine with no GPU
    (GPUs that CUDA cannot use are an error, not a silent CPU run)."""

    @property
    def model_chunks(self) -> int:
        """Model chunks per pipeline rank: ``virtual_pipeline``, 1 when unset."""
        return self.virtual_pipeline or 1

    @property
    def virtual_pipeline_size(self) -> int | None:
        """Megatron's ``virtual_pipeline_model_parallel_size``: the chunk count when the
        schedule is interleaved (more than one chunk), else None."""
        return self.model_chunks if self.interleaved else None

    @property
    def interleaved(self) -> bool:
        """Whether the interleaved (virtual-pipeline) schedule runs."""
        return self.model_chunks > 1

    @property
    def pipeline_stages(self) -> int:
        """Layer groups the model is cut into: pipeline ranks x chunks per rank."""
        return self.pipeline * self.model_chunks

    def validate(self) -> None:
        at_least("parallel.tensor", self.tensor, 1)
        at_least("parallel.pipeline", self.pipeline, 1)
        at_least("parallel.timeout_s", self.timeout_s, 1)
        require(
            self.data is None or self.data >= 1,
            f"parallel.data={self.data} must be >= 1 (or null to derive)",
        )
        if self.virtual_pipeline is not None:
            at_least("parallel.virtual_pipeline", self.virtual_pipeline, 1)
            require(
                self.virtual_pipeline == 1 or self.pipeline > 1,
                f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline > 1",
            )
        require(
            not self.sequence_parallel or self.tensor > 1,
            "parallel.sequence_parallel=true needs parallel.tensor > 1",
        )
        require(
            not self.overlap_param_gather or self.distributed_optimizer,
            "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true",
        )
