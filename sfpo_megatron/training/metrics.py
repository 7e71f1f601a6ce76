"""Where a run's metrics go: ``metrics.jsonl`` (the record ``sfpo-megatron plot`` reads),
optional TensorBoard and Weights & Biases, and a one-line progress report, all from rank 0."""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.common.files import write_atomic
from sfpo_megatron.common.log import global_rank
from sfpo_megatron.config import LoggingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
WANDB_ID_FILE = "wandb_id"

# Top-level phases of an iteration (they add up to about ``seconds``) and their short names.
# SFPO's time_fast (snapshot included: time_snapshot) / time_reposition / time_slow are parts
# of time_update, so not listed. One step off-policy, rollout and reward ran beside the
# previous iteration's training; time_rollout_wait is what that iteration waited for them.
PHASES = {
    "time_rollout": "rollout",
    "time_rollout_wait": "waited",
    "time_reward": "reward",
    "time_old_logprobs": "logp",
    "time_update": "update",
    "time_sync": "sync",
    "time_eval": "eval",
    "time_checkpoint": "ckpt",
}
# Training statistics of the progress line: key, short name, format.
STATS = (
    ("reward_mean", "reward", ".3f"),
    ("accuracy", "acc", ".3f"),
    ("entropy", "entropy", ".3f"),
    ("entropy_z", "z", "+.2f"),
    ("response_length", "len", ".1f"),
    ("rollouts", "rollouts", ".0f"),
    ("tokens_per_s", "tok/s", ".0f"),
)
EVAL_PREFIX = "eval/"
ENGINE_TIME = "time_rollout_engine"
"""Prefix of each rollout engine's generation seconds (``time_rollout_engine<e>``)."""
SLOW_ENGINE = 1.5
"""An engine that took at least this many times the median of the others' rollout time is
named in the progress line."""


class MetricsFileError(ValueError):
    """A metrics.jsonl line is not a JSON object with an integer ``iteration``."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file. A last line without its newline that does not parse
    is a write cut short by a kill and is dropped; any other bad line is an error."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise MetricsFileError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise MetricsFileError(f"{path}:{number}: not an object with an integer iteration")
        records.append(record)
    return records


def _record_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def is_number(value: Any) -> bool:
    """Plottable / formattable: an int or float (bools count as 0/1)."""
    return isinstance(value, int | float)


def format_duration(seconds: float) -> str:
    """``42s``, ``6m02s``, ``1h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def slow_engine(metrics: dict[str, float]) -> str | None:
    """``engine 3 slow 2.1x`` when one rollout engine took at least :data:`SLOW_ENGINE` times
    the median of the other engines' time."""
    times = {
        k.removeprefix(ENGINE_TIME): v for k, v in metrics.items() if k.startswith(ENGINE_TIME)
    }
    if len(times) < 2:
        return None
    slowest = max(times, key=times.__getitem__)
    others = statistics.median(v for k, v in times.items() if k != slowest)
    if others <= 0 or times[slowest] < SLOW_ENGINE * others:
        return None
    return f"engine {slowest} slow {times[slowest] / others:.1f}x"


class MetricsLog:
    """Every ``log`` call becomes one metrics.jsonl line (flushed at once, so a killed run keeps
    its history), a TensorBoard / W&B step when enabled, and a progress line every
    ``log_interval`` iterations. Ranks other than global rank 0 do nothing."""

    def __init__(
        self,
        cfg: LoggingConfig,
        total_iterations: int,
        run_config: dict,
        resume_from: int = 0,
    ) -> None:
        self.cfg, self.total, self.resume_from = cfg, total_iterations, resume_from
        self.enabled = global_rank() == 0
        self.algorithm = str(run_config.get("algorithm", {}).get("name", ""))
        self.start = time.perf_counter()
        self._file = self._tensorboard = self._wandb = None
        if not self.enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # The optional sinks first: a missing package fails before any history is rewritten.
        if cfg.tensorboard:
            self._tensorboard = self._open_tensorboard(out)
        if cfg.wandb_project:
            self._wandb = self._open_wandb(out, run_config)
        write_atomic(out / CONFIG_FILE, json.dumps(run_config, indent=2, default=str) + "\n")
        path = out / METRICS_FILE
        kept = []
        if resume_from > 0 and path.exists():
            # A killed run may have logged iterations past the checkpoint it resumes from.
            kept = [r for r in read_metrics(path) if r["iteration"] <= resume_from]
        write_atomic(path, "".join(_record_line(r) for r in kept))
        self._file = path.open("a")

    def _open_tensorboard(self, out: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package (pip install tensorboard)"
            ) from None
        # Like metrics.jsonl: a fresh run hides every older event, a resumed one those after
        # its checkpoint (TensorBoard drops events from this step on in earlier files).
        purge_step = self.resume_from + 1 if self.resume_from > 0 else 0
        return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def _open_wandb(self, out: Path, run_config: dict) -> Any:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"logging.wandb_project={self.cfg.wandb_project!r} needs the wandb package "
                "(pip install wandb)"
            ) from None
        id_file = out / WANDB_ID_FILE
        if self.resume_from > 0 and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            write_atomic(id_file, run_id + "\n")
        return wandb.init(
            project=self.cfg.wandb_project,
            config=run_config,
            dir=str(out),
            resume="allow",
            id=run_id,
        )

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` measured at ``iteration``; several calls may share an iteration
        (an evaluation logged apart from the training step)."""
        if not self.enabled:
            return
        self._file.write(_record_line({"iteration": iteration, **metrics}))
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if is_number(value):
                    self._tensorboard.add_scalar(key, value, global_step=iteration)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=iteration)
        has_eval = any(key.startswith(EVAL_PREFIX) for key in metrics)
        if has_eval or iteration % self.cfg.log_interval == 0 or iteration == self.total:
            logger.info("%s", self.progress_line(iteration, metrics))

    def progress_line(self, iteration: int, metrics: dict[str, float]) -> str:
        """``iter 12/100 sfpo a=0.80 reward 0.412 ... | rollout 1.2s ... | 4.1s/it eta 6m02s``;
        whatever is missing from ``metrics`` is left out."""
        m = {key: value for key, value in metrics.items() if is_number(value)}
        head = [f"iter {iteration}/{self.total}"]
        if "sfpo_active" in m:
            head.append("sfpo" if m["sfpo_active"] else "grpo")
            if m["sfpo_active"] and "alpha" in m:
                head.append(f"a={m['alpha']:.2f}")
        elif self.algorithm and any(key in m for key, _, _ in STATS):
            head.append(self.algorithm)
        head += [f"{name} {m[key]:{spec}}" for key, name, spec in STATS if key in m]
        macro = EVAL_PREFIX + "macro"
        eval_keys = sorted((k for k in m if k.startswith(EVAL_PREFIX)), key=lambda k: k != macro)
        evals = [f"{key.removeprefix(EVAL_PREFIX)} {m[key]:.3f}" for key in eval_keys]
        phases = [f"{name} {m[key]:.1f}s" for key, name in PHASES.items() if key in m]
        tail = [f"{m['seconds']:.1f}s/it"] if "seconds" in m else []
        done = iteration - self.resume_from
        if done > 0 and iteration < self.total:
            per_iteration = (time.perf_counter() - self.start) / done
            tail.append(f"eta {format_duration(per_iteration * (self.total - iteration))}")
        slow = slow_engine(m)
        sections = (head, ["eval", *evals] if evals else [], [slow] if slow else [], phases, tail)
        return " | ".join(" ".join(section) for section in sections if section)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
