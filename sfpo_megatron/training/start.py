"""Starting a built run: resume from a training checkpoint, or warm-start the fresh policy;
then open the metrics log (it continues a resumed history) and give the rollout engine the
weights it serves first."""

from __future__ import annotations

import logging
from pathlib import Path

from sfpo_megatron.algorithms.warm_start import warm_start
from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.training.build import Run
from sfpo_megatron.training.metrics import MetricsLog
from sfpo_megatron.training.train_checkpoint import (
    holds_reference,
    latest_complete,
    load_checkpoint,
    load_next_batch,
)

log = logging.getLogger(__name__)


def start_run(run: Run) -> MetricsLog:
    """Resume or warm-start ``run``, then sync its weights as version ``run.iteration``
    (collective). Returns its metrics log, closed with the run."""
    path = resume_path(run)
    if path is not None:
        resume(run, path)
    elif run.cfg.train.warm_start_steps:
        warm_start_policy(run)
    cfg = run.cfg
    metrics_log = MetricsLog(cfg.logging, cfg.train.iterations, cfg.to_dict(), run.iteration)
    run.resources.callback(metrics_log.close)
    run.rollout.sync(version=run.iteration)
    return metrics_log


def resume_path(run: Run) -> Path | None:
    """The training checkpoint ``checkpoint.resume`` names (``auto``: the latest complete one
    under ``checkpoint.dir``), or None for a fresh run."""
    resume = run.cfg.checkpoint.resume
    if resume is None:
        return None
    path = latest_complete(run.cfg.checkpoint.dir) if resume == "auto" else Path(resume)
    if path is not None:
        log.info("resuming from %s", path)
    return path


def resume(run: Run, path: Path) -> None:
    """Everything from the training checkpoint at ``path``; the KL reference too where it
    stores one (it was warm-started), else the reference stays the model as built."""
    kl_reference = run.kl_reference
    if kl_reference is not None and not holds_reference(path):
        if run.cfg.train.warm_start_steps:
            raise ConfigError(
                f"checkpoint {path} holds no KL reference policy, but with "
                f"algorithm.kl_coef > 0 and train.warm_start_steps > 0 the reference is the "
                f"warm-started policy, which only the checkpoint can give back: resume with "
                f"the config that wrote it"
            )
        kl_reference = None
    run.load_training_state(load_checkpoint(path, run.actor, kl_reference))
    run.next_batch = load_next_batch(path)


def warm_start_policy(run: Run) -> None:
    """``train.warm_start_steps`` supervised steps on the reference answers; the KL reference
    becomes the warm-started policy (the policy RL starts from)."""
    t, tokenizer = run.cfg.train, run.tokenizer
    warm_start(
        run.actor,
        run.prompts.with_seed(run.cfg.data.seed + 1),
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        tokenizer.eos_token_id,
        t.warm_start_steps,
        t.warm_start_lr if t.warm_start_lr is not None else run.cfg.optimizer.lr,
    )
    if run.kl_reference is not None:
        run.kl_reference.capture()
