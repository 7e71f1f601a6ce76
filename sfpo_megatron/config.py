"""Typed run configuration: YAML file + ``key.sub=value`` overrides, validated at load time
by :mod:`sfpo_megatron.config_rules`.

Every default lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config_rules import validate


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
    vocab_pad_multiple: int = 128
    """The vocabulary is padded to a multiple of this x TP, as Megatron-LM does."""
    recompute_activations: bool = False


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


@dataclass
class TrainConfig:
    iterations: int = 1
    prompts_per_step: int = 256
    samples_per_prompt: int = 8
    """Group size n of GRPO: responses sampled per prompt."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step; a training pass makes prompts_per_step / this many steps."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts
    until ``prompts_per_step`` groups have signal (or ``max_sampling_rounds`` is reached)."""
    max_sampling_rounds: int = 4
    warm_start_steps: int = 0
    """Supervised optimizer steps on the prompts' reference answers before RL (demo models
    that start from random weights); 0 = none. Skipped when resuming from a checkpoint."""
    warm_start_lr: float | None = None
    """Constant learning rate of the warm-start steps; None = ``optimizer.lr``. The RL LR
    schedule (its warm-up included) starts after the warm start, untouched by it."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    decay_norms_and_biases: bool = False
    """False: weight decay skips biases and norm weights (every 1-D param; Megatron's
    convention). True: every parameter decays (the SFPO reference code and verl)."""


@dataclass
class SFPOConfig:
    inner_steps: int = 3
    """K: fast training passes on the same batch before the reposition."""
    alpha: float = 0.8
    """Reposition theta0 + alpha (thetaK - theta0)."""
    switch_to_grpo: bool = True
    """Switch to plain GRPO for good once the entropy z-score crosses ``tau`` (alpha itself
    never adapts); false: SFPO every iteration."""
    window: int = 30
    """omega: entropy values in the z-score window (the current one included)."""
    tau: float = 1.0
    one_sided: bool = True
    """True: switch on Z >= tau (the reference code); False: on |Z| >= tau (the paper)."""
    snapshot: Literal["gpu", "host"] = "gpu"
    """Where theta0 is kept: device memory, or pinned host memory (0 extra device bytes)."""


@dataclass
class AlgorithmConfig:
    name: Literal["grpo", "sfpo"] = "sfpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    """> clip_eps_low turns on clip-higher (DAPO)."""
    entropy_coef: float = 0.001
    kl_coef: float = 0.0
    """KL-to-reference weight (low-variance k3 estimator); 0 needs no reference model."""
    sfpo: SFPOConfig = field(default_factory=SFPOConfig)


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    """Sampling temperature; the actor divides logits by it so log-probs match the sampler."""
    top_p: float = 1.0
    top_k: int = -1
    max_response_length: int = 2560
    engine: Literal["embedded", "servers", "colocated"] = "embedded"
    """Where rollouts run: ``embedded`` = the policy in rank 0's process
    (:mod:`sfpo_megatron.rollout.embedded`), fed by the export stream after every update;
    ``servers`` = SGLang servers (or ``python -m sfpo_megatron.rollout.http_server``) at
    ``server_urls``, fed over a broadcast
    group per server and pipeline stage (NCCL on GPU, gloo on CPU); ``colocated`` = one server
    per ``server_tp`` trainer ranks, launched by the trainer on those ranks' devices, fed
    through CUDA-IPC handles (shared memory on CPU), its memory released while training."""
    server: Literal["sglang", "embedded"] = "sglang"
    """The program a colocated run launches per engine (``embedded``: our HTTP server)."""
    restart_servers: bool = True
    """Colocated: a server that died is restarted, its weights re-sent and the batch sampled
    again (once); servers of other runs (``servers``) are only reported."""
    server_urls: list[str] = field(default_factory=list)
    """Base URLs of the rollout servers; prompts are split evenly across them."""
    server_tp: int = 1
    """GPUs (TP ranks) of each server: its side of the weight broadcast group."""
    sync_port: int = 29900
    """First port of the weight broadcast groups (one per server and pipeline stage)."""
    sync_address: str | None = None
    """Address servers reach this node's trainer ranks at; None = this host's name."""
    request_timeout_s: float = 600.0
    """Per generation request; a timed-out or failed request is retried, then the batch fails."""
    kv_cache_gb: float = 16.0
    """Embedded engine (and its server): KV cache memory; the rows of a batch that do not fit
    together are decoded in successive groups."""
    cuda_graphs: bool = True
    """Embedded engine on CUDA: replay each decode step as a captured CUDA graph."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL / Parquet prompt files (relative paths: to the config file)."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    source_key: str = "data_source"
    skip_malformed: bool = False
    """False: a malformed row stops the run with its file and line; true: skip and count."""
    require_answer: bool = True
    """A row without ``answer_key`` (missing, null or NaN) is malformed; false: its answer is
    ``""`` (for reward functions that need no reference)."""
    tokenizer: str | None = None
    """Tokenizer directory; None = the model's ``hf_config`` directory."""
    use_chat_template: bool = True
    max_prompt_length: int = 1536
    seed: int = 1


@dataclass
class RewardConfig:
    fn: str = "math"
    """``math`` (boxed answer, math-verify equivalence), ``module:function`` or
    ``path/file.py:function`` called as fn(response, answer, source) -> float; checked and
    called once on the first training row before the run starts."""
    workers: int = 2
    """Reward processes (0 = in the trainer's process)."""
    timeout_s: float = 10.0
    """Per sample: a slower reward function scores 0 and is counted."""
    max_error_fraction: float = 1.0
    """Stop the run when at least this share of one sampling round's samples (and at least
    one) hit a reward error (a raise, a non-number, a dead worker); 1.0: only when every one
    did, 0: at the first. Timeouts are counted apart (``reward_timeouts``) and never stop it."""


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    interval: int = 0
    """Evaluate every this many iterations (and after the last); 0 = never."""
    k: int = 4
    """Samples per problem: pass@1 is reported as avg@k."""
    temperature: float = 1.0
    top_p: float = 0.7


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    log_interval: int = 1
    """Print the progress line every this many iterations (and after evaluations and the last
    one); metrics.jsonl gets every iteration."""
    tensorboard: bool = False
    """Also write TensorBoard event files to ``output_dir/tensorboard``."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs ``wandb``)."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    interval: int = 0
    """Save every this many iterations; 0 = only at the end when ``dir`` is set."""
    resume: str | None = None
    """``auto``: continue from the newest complete checkpoint in ``dir`` (start fresh if none);
    a path: from that checkpoint; None: start fresh."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""
    export_hf_dir: str | None = None
    """At the end of training, write the policy here as a HF checkpoint."""
    export_shard_mb: float = 2048
    stop_signals: list[str] = field(default_factory=lambda: ["USR1"])
    """Signals that ask the trainer to stop early: it finishes the current iteration, saves
    its checkpoint and exits with the status
    :data:`sfpo_megatron.training.stop_request.EXIT_STATUS`.
    Names as ``kill -l`` lists them (``USR1``, ``USR2``, ``INT``; ``SIG`` prefix optional);
    [] = none. ``TERM`` is left alone by default: torchrun forwards it to its ranks and kills
    them after a short grace, too soon for a checkpoint."""
    stop_file: str | None = "STOP"
    """A file whose appearance asks the same (polled by rank 0 once per iteration; removed by
    the trainer once it stopped or finished, so the next run does not stop at once). Relative:
    inside ``dir``. Off when null or without ``dir``. It reaches the trainer where a signal
    cannot: under torchrun the agent dies of ``USR1``, taking the ranks with it."""

    @property
    def stop_path(self) -> Path | None:
        """The stop file's path (None when off)."""
        if self.dir is None or self.stop_file is None:
            return None
        return Path(self.dir) / self.stop_file


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def sequences_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    @property
    def sequences_per_mini_batch(self) -> int:
        return self.train.mini_batch_prompts * self.train.samples_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML file (or start from defaults), apply ``key.sub=value`` overrides, validate.

    Relative ``model.hf_config`` paths in a file are taken relative to that file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _resolve_paths(raw, Path(path).resolve().parent)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


_FILE_PATHS = (
    ("model", "hf_config"),
    ("data", "train_files"),
    ("data", "tokenizer"),
    ("eval", "files"),
)
"""Keys holding input files, which a config file names relative to itself (and reward.fn's
``path/file.py`` part)."""


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    reward = raw.get("reward")
    fn = reward.get("fn") if isinstance(reward, dict) else None
    if isinstance(fn, str) and ".py:" in fn:  # a reward function by file path
        path, _, name = fn.rpartition(":")
        if not Path(path).is_absolute():
            reward["fn"] = f"{base / path}:{name}"
    for section, key in _FILE_PATHS:
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node[key]
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[key] = str(base / value)
        elif isinstance(value, list):
            node[key] = [
                str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                for v in value
            ]


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix}{key}'{hint} (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(item, inner, key) for item in value]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint}")
