"""The training loop (for now on synthetic batches: rollouts and rewards plug in here later),
and the HF export entry point."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from sfpo_megatron.actor import Actor
from sfpo_megatron.algorithms import build_update
from sfpo_megatron.checkpoint_io.hf_export import save_hf
from sfpo_megatron.checkpoint_io.hf_import import HFCheckpoint, load_hf_weights
from sfpo_megatron.config import Config
from sfpo_megatron.distributed import init_distributed, shutdown
from sfpo_megatron.models.arch import ModelArch, hf_directory, read_hf_config
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.synthetic import random_batch


class MetricsLog:
    """One progress line per iteration on rank 0, and every metric in ``metrics.jsonl``."""

    def __init__(self, output_dir: str, total: int, interval: int) -> None:
        self.rank0 = dist.get_rank() == 0
        self.total, self.interval, self.start = total, interval, time.perf_counter()
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.rank0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def __call__(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.rank0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if iteration % self.interval == 0 or iteration == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / iteration * (self.total - iteration)
            mode = "sfpo" if metrics.get("sfpo_active") else "grpo"
            z = f" z {metrics['entropy_z']:+.2f}" if "entropy_z" in metrics else ""
            print(
                f"iter {iteration}/{self.total} {mode} loss {metrics['pg_loss']:+.4f} "
                f"entropy {metrics['entropy']:.4f}{z} clip {metrics['clip_frac']:.3f} "
                f"grad_norm {metrics['grad_norm']:.3f} tokens {int(metrics['tokens'])} "
                f"lr {metrics['lr']:.2e} {metrics['seconds']:.2f}s eta {eta:.0f}s",
                flush=True,
            )


def start(cfg: Config) -> tuple[ModelArch, HFCheckpoint | None]:
    """Check the config against the model and its weights (before anything is started or
    written), then start the process groups. Returns the model shape and its weights."""
    arch = read_hf_config(cfg.model.hf_config)
    checkpoint = None
    if cfg.model.load_weights:
        checkpoint = HFCheckpoint(hf_directory(cfg.model.hf_config))
        checkpoint.validate(arch)
    init_distributed(cfg, arch)
    return arch, checkpoint


def train(cfg: Config) -> list[dict[str, float]]:
    """Run ``train.iterations`` iterations of the configured algorithm; returns the metrics."""
    arch, checkpoint = start(cfg)
    try:
        actor = Actor.build(cfg, arch, checkpoint)
        update = build_update(cfg.algorithm, actor)
        generator = torch.Generator().manual_seed(cfg.data.seed)
        log = MetricsLog(cfg.logging.output_dir, cfg.train.iterations, cfg.logging.log_interval)
        history = []
        for iteration in range(1, cfg.train.iterations + 1):
            start_time = time.perf_counter()
            batch = random_batch(cfg, arch, generator)
            old_logprobs, _ = actor.forward_logprobs(batch)
            metrics = update.step(replace(batch, old_logprobs=old_logprobs))
            metrics["lr"] = actor.scheduler.get_lr(actor.optimizer.param_groups[0])
            actor.step_lr()
            metrics["seconds"] = time.perf_counter() - start_time
            log(iteration, metrics)
            history.append(metrics)
        if cfg.checkpoint.export_hf_dir:
            save_hf(
                actor.chunks,
                arch,
                hf_directory(cfg.model.hf_config),
                cfg.checkpoint.export_hf_dir,
                cfg.checkpoint.export_shard_mb,
            )
        return history
    finally:
        shutdown()


def export_hf(cfg: Config, out: str) -> None:
    """Load the configured model through Megatron (resharded to the configured layout) and
    write it back as a HF checkpoint at ``out``."""
    arch, checkpoint = start(cfg)
    try:
        chunks = build_model(cfg, arch)
        if checkpoint is not None:
            load_hf_weights(chunks, arch, checkpoint)
        save_hf(
            chunks, arch, hf_directory(cfg.model.hf_config), out, cfg.checkpoint.export_shard_mb
        )
    finally:
        shutdown()
