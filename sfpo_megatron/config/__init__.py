"""Typed run configuration: one dataclass per YAML section, each with its defaults (the one
place for them) and a ``validate()`` next to its fields.

- :mod:`~sfpo_megatron.config.model`: ``model``, ``parallel`` (and the derived virtual-pipeline
  facts: :attr:`ParallelConfig.model_chunks`, :attr:`ParallelConfig.virtual_pipeline_size`);
- :mod:`~sfpo_megatron.config.training`: ``train``, ``optimizer``, ``algorithm`` (+ ``sfpo``);
- :mod:`~sfpo_megatron.config.io`: ``rollout``, ``data``, ``reward``, ``eval``, ``logging``,
  ``checkpoint``;
- :mod:`~sfpo_megatron.config.run`: :class:`Config`, and the rules that span sections;
- :mod:`~sfpo_megatron.config.loading`: YAML + overrides -> :class:`Config` (:func:`load_config`;
  renamed keys in :data:`RENAMED_KEYS`);
- :mod:`~sfpo_megatron.config.layout`: the rules that also need the model shape and the world
  size (:func:`validate_layout`, :func:`validate_lengths`).
"""

from sfpo_megatron.config.io import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    RewardConfig,
    RolloutConfig,
    stop_signal,
)
from sfpo_megatron.config.layout import (
    ModelShape,
    data_parallel_size,
    validate_layout,
    validate_lengths,
)
from sfpo_megatron.config.loading import RENAMED_KEYS, load_config
from sfpo_megatron.config.model import ModelConfig, ParallelConfig
from sfpo_megatron.config.run import Config
from sfpo_megatron.config.training import (
    MAX_SAMPLING_ROUNDS,
    SEEDS_PER_ITERATION,
    AlgorithmConfig,
    OptimizerConfig,
    SFPOConfig,
    TrainConfig,
)

__all__ = [
    "MAX_SAMPLING_ROUNDS",
    "RENAMED_KEYS",
    "SEEDS_PER_ITERATION",
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "ModelShape",
    "OptimizerConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFPOConfig",
    "TrainConfig",
    "data_parallel_size",
    "load_config",
    "stop_signal",
    "validate_layout",
    "validate_lengths",
]
