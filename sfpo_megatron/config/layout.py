"""The rules that need the model's shape and the world size as well as the config: TP divides
heads, PP x VPP divides layers, world = TP x PP x DP, a mini-batch splits into micro-batches
(:func:`validate_layout`, which also gives the DP size), and a training sequence fits the
model's positions (:func:`validate_lengths`). They run once both are known.

The model shape is any object with the :class:`ModelShape` attributes
(:class:`sfpo_megatron.models.arch.ModelArch` is one), so this layer imports nothing above it.
"""

from __future__ import annotations

from typing import Protocol

from sfpo_megatron.config.checks import require
from sfpo_megatron.config.run import Config


class ModelShape(Protocol):
    """What the layout rules read of a model."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    max_position_embeddings: int


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """DP size for this world; checks world size = TP x PP x DP."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline
    require(
        world_size % model_parallel == 0,
        f"world size {world_size} must be divisible by parallel.tensor x parallel.pipeline "
        f"= {p.tensor} x {p.pipeline}",
    )
    dp = world_size // model_parallel
    require(
        p.data is None or p.data == dp,
        f"parallel.data={p.data} but world size {world_size} = tensor {p.tensor} x pipeline "
        f"{p.pipeline} x data {dp}",
    )
    return dp


def validate_layout(cfg: Config, arch: ModelShape, world_size: int) -> int:
    """Rules that need the model shape and the world size; returns the DP size."""
    p, t = cfg.parallel, cfg.train
    for count, name in [
        (arch.num_attention_heads, "num_attention_heads"),
        (arch.num_query_groups, "num_key_value_heads"),
        (arch.ffn_hidden_size, "intermediate_size"),
    ]:
        require(
            count % p.tensor == 0,
            f"parallel.tensor={p.tensor} must divide the model's {name}={count}",
        )
    require(
        arch.num_layers % p.pipeline_stages == 0,
        f"parallel.pipeline={p.pipeline} x parallel.virtual_pipeline={p.model_chunks} "
        f"must divide the model's num_hidden_layers={arch.num_layers}",
    )
    dp = data_parallel_size(cfg, world_size)
    r = cfg.rollout
    require(
        r.engine == "servers" or world_size % r.server_tp == 0,
        f"rollout.engine={r.engine}: rollout.server_tp={r.server_tp} must divide the world size "
        f"{world_size} (one engine per server_tp trainer ranks)",
    )
    if t.packing:
        return dp
    per_rank = t.micro_batch_size * dp
    require(
        cfg.sequences_per_mini_batch % per_rank == 0,
        f"a mini-batch of train.mini_batch_prompts x train.samples_per_prompt = "
        f"{cfg.sequences_per_mini_batch} sequences must split into train.micro_batch_size="
        f"{t.micro_batch_size} x data-parallel size {dp} (micro-batches x DP) when "
        f"train.packing=false",
    )
    if p.interleaved:
        micro_batches = cfg.sequences_per_mini_batch // per_rank
        require(
            micro_batches % p.pipeline == 0,
            f"the interleaved schedule needs micro-batches per mini-batch ({micro_batches}) to be "
            f"a multiple of parallel.pipeline={p.pipeline} when train.packing=false",
        )
    return dp


def validate_lengths(cfg: Config, arch: ModelShape) -> None:
    """A training run's prompt + response must fit the model's positions."""
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.max_response_length
    require(
        cfg.longest_sequence <= arch.max_position_embeddings,
        f"data.max_prompt_length={prompt} + rollout.max_response_length={response} = "
        f"{cfg.longest_sequence} tokens exceed the model's max_position_embeddings="
        f"{arch.max_position_embeddings} of model.hf_config={cfg.model.hf_config}",
    )
