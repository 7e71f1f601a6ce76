"""What happens after each iteration, each its own small step: the evaluation, the training
checkpoint and the stop request; and at the end of a run, its HF export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from sfpo_megatron.hf.export import save_hf
from sfpo_megatron.models.arch import hf_directory
from sfpo_megatron.training.build import Run
from sfpo_megatron.training.sampling import eval_sampling
from sfpo_megatron.training.train_checkpoint import checkpoint_dir


def after_iteration(run: Run, iteration: int) -> dict[str, float]:
    """Collective, once ``iteration`` is trained and synced: its evaluation when due, whether
    to stop (``run.stopping``), its training checkpoint when due (a stop makes it due).
    Returns their metrics."""
    run.iteration = iteration
    last = iteration == run.cfg.train.iterations
    metrics: dict[str, float] = {}
    if evaluation_due(run, iteration, last):
        clock = time.perf_counter()
        metrics.update(evaluate(run, iteration))
        metrics["time_eval"] = time.perf_counter() - clock
    run.stopping = run.stop_request.agreed() and not last  # the last iteration just finishes
    if checkpoint_due(run, iteration, last):
        clock = time.perf_counter()
        save_checkpoint(run, iteration)
        metrics["time_checkpoint"] = time.perf_counter() - clock
    return metrics


def evaluation_due(run: Run, iteration: int, last: bool) -> bool:
    """Every ``eval.interval`` iterations and after the last one (never with interval 0)."""
    interval = run.cfg.eval.interval
    return bool(interval) and (iteration % interval == 0 or last)


def evaluate(run: Run, iteration: int) -> dict[str, float]:
    """avg@k on the evaluation set at the weights of ``iteration``; a new best macro score is
    kept (and written to ``logging.output_dir/best.json`` by rank 0)."""
    params = eval_sampling(run.cfg, run.tokenizer.eos_token_id, iteration)
    result = run.scorer.evaluate(run.eval_items, params, run.cfg.train.prompts_per_step)
    if run.best is None or result["eval/macro"] > run.best["eval/macro"]:
        run.best = {"iteration": iteration, "eval/macro": result["eval/macro"]}
        if dist.get_rank() == 0:
            out = Path(run.cfg.logging.output_dir) / "best.json"
            out.write_text(json.dumps(run.best) + "\n")
    return result


def checkpoint_due(run: Run, iteration: int, last: bool) -> bool:
    """With ``checkpoint.dir``: every ``checkpoint.interval`` iterations, after the last one,
    and when the run stops on request."""
    interval = run.cfg.checkpoint.interval
    due = (interval and iteration % interval == 0) or last or run.stopping
    return run.train_checkpoints is not None and bool(due)


def save_checkpoint(run: Run, iteration: int) -> None:
    """The training checkpoint of ``iteration``; it stores the KL reference only where a
    resumed run could not rebuild it (it is no longer the model as built)."""
    kl_reference = run.kl_reference
    if kl_reference is not None and kl_reference.as_built:
        kl_reference = None
    run.train_checkpoints.save(
        iteration, run.actor, run.training_state(), kl_reference, run.next_batch
    )


def stop_early(run: Run, iteration: int) -> NoReturn:
    """On every rank once ``run.stopping`` (its metrics logged): complete the checkpoint of
    ``iteration`` and raise :class:`~sfpo_megatron.training.stop_request.StopRequested`."""
    saved = None
    if run.train_checkpoints is not None:
        run.train_checkpoints.finalize()
        saved = checkpoint_dir(run.train_checkpoints.root, iteration)
    run.stop_request.end_run(iteration, run.cfg.train.iterations, saved)


def finish(run: Run) -> None:
    """At the end: the HF export if configured (the last checkpoint was saved already); a
    stop file that came too late to matter is removed."""
    run.stop_request.forget()
    c = run.cfg.checkpoint
    if c.export_hf_dir:
        source = hf_directory(run.cfg.model.hf_config)
        save_hf(run.actor.chunks, run.arch, source, c.export_hf_dir, c.export_shard_mb)
