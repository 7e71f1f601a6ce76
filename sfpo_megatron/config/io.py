"""The sections around the update: ``rollout`` (sampling and engines), ``data``, ``reward``,
``eval``, ``logging`` and ``checkpoint``."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sfpo_megatron.config.checks import above, at_least, require, within

MAX_PORT = 65535


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    """Sampling temperature; the actor divides logits by it so log-probs match the sampler."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 = off."""
    max_response_length: int = 2560
    engine: Literal["embedded", "servers", "colocated"] = "embedded"
    """Where rollouts run: ``embedded`` = the policy in the trainer's processes, one engine per
    ``server_tp`` ranks on that rank's device, each sampling its share of the prompts
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
    """GPUs (TP ranks) of each server: its side of the weight broadcast group. Embedded: one
    engine per this many trainer ranks (1 = every rank generates; the world size = one
    engine, on rank 0)."""
    sync_port: int = 29900
    """First port of the weight broadcast groups (one per server and pipeline stage)."""
    sync_address: str | None = None
    """Address servers reach this node's trainer ranks at; None = this host's name."""
    request_timeout_s: float = 600.0
    """Per generation request; a timed-out or failed request is retried, then the batch fails."""
    kv_cache_gb: float = 16.0
    """Embedded engine (and its server): KV cache memory per engine, as a pool of slots of one
    row each; rows beyond it wait for a slot (continuous batching)."""
    cuda_graphs: bool = True
    """Embedded engine on CUDA: replay each decode step as a captured CUDA graph."""
    weight_format: Literal["bf16", "fp8"] = "bf16"
    """Weights the rollout engines get: ``bf16`` = the model's own dtype; ``fp8`` = every
    decoder linear weight as e4m3 with 128x128 block scales (SGLang's ``fp8`` format, served
    with ``--quantization fp8``); embeddings, lm_head and norms stay in the model's dtype."""

    def validate(self) -> None:
        above("rollout.temperature", self.temperature, 0)
        within("rollout.top_p", self.top_p, 0, 1, open_low=True)
        require(
            self.top_k == -1 or self.top_k >= 1,
            f"rollout.top_k={self.top_k} must be -1 (off) or >= 1",
        )
        at_least("rollout.max_response_length", self.max_response_length, 1)
        require(
            self.engine != "servers" or bool(self.server_urls),
            "rollout.engine=servers needs rollout.server_urls",
        )
        require(
            self.engine != "colocated" or not self.server_urls,
            "rollout.engine=colocated launches its own servers: rollout.server_urls must be empty",
        )
        at_least("rollout.server_tp", self.server_tp, 1)
        within("rollout.sync_port", self.sync_port, 1, MAX_PORT)
        above("rollout.request_timeout_s", self.request_timeout_s, 0)
        above("rollout.kv_cache_gb", self.kv_cache_gb, 0)


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
    """Seed of the prompt order and of the rollouts' sampling seeds."""

    def validate(self) -> None:
        at_least("data.max_prompt_length", self.max_prompt_length, 1)
        at_least("data.seed", self.seed, 0)


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

    def validate(self) -> None:
        at_least("reward.workers", self.workers, 0)
        above("reward.timeout_s", self.timeout_s, 0)
        within("reward.max_error_fraction", self.max_error_fraction, 0, 1)


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    interval: int = 0
    """Evaluate every this many iterations (and after the last); 0 = never."""
    k: int = 4
    """Samples per problem: pass@1 is reported as avg@k."""
    temperature: float = 1.0
    top_p: float = 0.7

    def validate(self) -> None:
        at_least("eval.interval", self.interval, 0)
        require(self.interval == 0 or bool(self.files), "eval.interval > 0 needs eval.files")
        at_least("eval.k", self.k, 1)
        above("eval.temperature", self.temperature, 0)
        within("eval.top_p", self.top_p, 0, 1, open_low=True)


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

    def validate(self) -> None:
        at_least("logging.log_interval", self.log_interval, 1)


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
    """Safetensors shard size of the HF export."""
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

    def validate(self) -> None:
        at_least("checkpoint.interval", self.interval, 0)
        require(
            self.interval == 0 or self.dir is not None,
            "checkpoint.interval > 0 needs checkpoint.dir",
        )
        require(
            self.resume != "auto" or self.dir is not None,
            "checkpoint.resume=auto needs checkpoint.dir",
        )
        above("checkpoint.export_shard_mb", self.export_shard_mb, 0)
        for name in self.stop_signals:
            stop_signal(name)
        require(
            self.stop_file != "",
            "checkpoint.stop_file must name a file (null turns the stop file off)",
        )


def stop_signal(name: str) -> signal.Signals:
    """The signal a ``checkpoint.stop_signals`` entry names (``USR1`` or ``SIGUSR1``)."""
    full = name if name.startswith("SIG") else f"SIG{name}"
    require(
        full in signal.Signals.__members__ and full not in ("SIGKILL", "SIGSTOP"),
        f"checkpoint.stop_signals: {name!r} is not a signal a process can catch "
        f"(names as `kill -l` lists them: USR1, USR2, INT, ...)",
    )
    return signal.Signals[full]
