"""Reward functions (math verification, custom by import path) and a process-pool scorer that
keeps a misbehaving reward function from stalling or crashing the training run."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import multiprocessing
import numbers
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from sfpo_megatron.config import RewardConfig

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str], float]
REWARD_SIGNATURE = "fn(response: str, answer: str, source: str) -> float"

_MATH_VERIFY_TIMEOUT_S = 3  # per math_verify parse/compare; an int, as its signal.alarm needs
_KILL_GRACE_S = 1.0  # a pool worker gets this long past timeout_s before it is killed
_POLL_S = 0.05  # how often the pool loop looks for overdue tasks
_BOXED = re.compile(r"\\boxed\s*\{")


class RewardWarning(UserWarning):
    """A reward function fell back to 0.0 instead of raising; RewardComputer counts it an error."""


class RewardTimeoutWarning(RewardWarning):
    """As RewardWarning, for a time limit; RewardComputer counts it a timeout."""


class RewardFailure(RuntimeError):
    """Too many samples of one iteration hit reward errors (``reward.max_error_fraction``):
    the run would train on zeros."""


class _SampleTimeout(BaseException):
    """Raised by the per-sample alarm; a BaseException so `except Exception` cannot swallow it."""


def _last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...}, braces matched (a regex cannot nest)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text):
            if text[i] == "\\":
                i += 1  # an escaped brace, \{ or \}, does not nest
            elif text[i] in "{}":
                depth += 1 if text[i] == "{" else -1
                if depth == 0:
                    return text[match.end() : i]
            i += 1
    return None


def _as_math(text: str) -> str:
    """Plain answers ("3/4", "x^2+1") parse only inside math delimiters."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_reward(response: str, answer: str, source: str) -> float:
    """1.0 when the response's final answer (its last \\boxed{}, else what math_verify extracts)
    equals the reference mathematically, else 0.0. Never raises: a math_verify failure gives
    0.0 and a RewardWarning so that the caller can count it."""
    # math_verify's time limits use SIGALRM, which only the main thread may set.
    limit = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else 0
    try:
        gold = parse(_as_math(answer), parsing_timeout=limit, raise_on_error=True)
        if not gold:
            raise ValueError(f"the reference answer {answer!r} does not parse")
        boxed = _last_boxed(response)
        text = response if boxed is None else _as_math(boxed)
        pred = parse(text, parsing_timeout=limit, raise_on_error=True)
        return float(verify(gold, pred, timeout_seconds=limit, raise_on_error=True))
    except TimeoutException:
        warnings.warn("math_verify timed out", RewardTimeoutWarning, stacklevel=2)
    except Exception as e:
        warnings.warn(f"{type(e).__name__}: {e}", RewardWarning, stacklevel=2)
    return 0.0


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function of a spec: "math" (math_reward), "module:function" or
    "path/to/file.py:function"; errors name the spec and what failed. A function that cannot
    be called as :data:`REWARD_SIGNATURE` is a TypeError."""
    if spec == "math":
        return math_reward
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward spec {spec!r}: not 'math', 'module:fn' or 'path/file.py:fn'")
    try:
        module = _import_file(target) if target.endswith(".py") else importlib.import_module(target)
    except Exception as e:
        raise ImportError(f"reward spec {spec!r}: cannot import {target!r}: {e!r}") from e
    if not hasattr(module, name):
        raise AttributeError(f"reward spec {spec!r}: {target!r} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"reward spec {spec!r}: {name!r} is a {type(fn).__name__}, not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have none to inspect
        return fn
    try:
        signature.bind("response", "answer", "source")
    except TypeError as e:
        raise TypeError(
            f"reward spec {spec!r}: {name}{signature} cannot be called as {REWARD_SIGNATURE}: {e}"
        ) from None
    return fn


def _import_file(path: str) -> Any:
    """Import a .py file by path (not via sys.path). It goes into sys.modules, as dataclasses and
    pickle expect, under a name unique to the path, so two reward.py files do not collide."""
    name = "_sfpo_reward_" + re.sub(r"\W", "_", str(Path(path).resolve()))
    file_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    file_spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` with _SampleTimeout (SIGALRM: main thread only, and
    only between Python bytecodes; the pool kills workers that this cannot stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _SampleTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call(fn: RewardFn, timeout_s: float, *sample: str) -> tuple[float, str, str]:
    """(reward, "ok" | "error" | "timeout", why it is not ok) for one sample; never raises but
    KeyboardInterrupt."""
    start = time.monotonic()
    try:
        with _alarm(timeout_s), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RewardWarning)
            value = fn(*sample)
    except _SampleTimeout:
        return 0.0, "timeout", f"ran past {timeout_s:.1f} s"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: it must not end a pool worker or the trainer
        return 0.0, "error", f"raised {type(e).__name__}: {e}"
    status, why = "ok", ""
    for w in caught:
        if issubclass(w.category, RewardWarning):
            status = "timeout" if issubclass(w.category, RewardTimeoutWarning) else "error"
            why = f"warned: {w.message}"
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if time.monotonic() - start > timeout_s:  # the alarm could not interrupt it
        return 0.0, "timeout", f"ran past {timeout_s:.1f} s"
    if status == "ok" and not (isinstance(value, numbers.Real) and math.isfinite(value)):
        return 0.0, "error", f"returned {value!r}, not a finite number"
    return (float(value), "ok", "") if status == "ok" else (0.0, status, why)


def _score_one(fn: RewardFn, timeout_s: float, *sample: str) -> tuple[float, str]:
    """(reward, "ok" | "error" | "timeout") for one sample, a warning logged when not ok."""
    reward, status, why = _call(fn, timeout_s, *sample)
    if status != "ok":
        logger.warning("reward function %s; reward 0.0", why)
    return reward, status


def probe_reward_fn(fn: RewardFn, timeout_s: float, answer: str, source: str) -> str | None:
    """Why ``fn`` fails when called once as the trainer will call it, with the reference
    ``answer`` as the response (a raise, a warning, a non-number, past ``timeout_s``), or
    None when it returns a finite number."""
    _, status, why = _call(fn, timeout_s, answer, answer, source)
    return None if status == "ok" else why


def check_error_fraction(errors: int, samples: int, max_fraction: float, spec: str) -> None:
    """:class:`RewardFailure` when ``errors`` of ``samples`` (at least one) reach
    ``max_fraction`` of them."""
    if errors and errors >= max_fraction * samples:
        raise RewardFailure(
            f"{errors} of {samples} samples of this iteration hit a reward error in "
            f"reward.fn={spec!r} (the warnings above say why), reaching "
            f"reward.max_error_fraction={max_fraction:g}: stopping rather than training on "
            "zeros"
        )


_worker: dict[str, Any] = {}  # this pool worker's reward function, limit and start-report queue


def _worker_init(spec: str, timeout_s: float, started: Any) -> None:
    _worker.update(fn=load_reward_fn(spec), timeout_s=timeout_s, started=started)


def _worker_score(task: int, *sample: str) -> tuple[float, str]:
    # Synchronous put: the parent learns the task started (its clock, the pid to kill) even if
    # the function then ends this process.
    _worker["started"].put((task, os.getpid()))
    return _score_one(_worker["fn"], _worker["timeout_s"], *sample)


class RewardComputer:
    """Scores batches with the reward function of `spec` in `workers` worker processes (0: in
    this process), so that a slow, raising, hanging or process-killing function costs a 0.0
    reward and a count, never the run. Each sample gets `timeout_s`."""

    def __init__(
        self,
        spec: str,
        workers: int = RewardConfig.workers,
        timeout_s: float = RewardConfig.timeout_s,
    ) -> None:
        if workers < 0 or timeout_s <= 0:
            raise ValueError(f"need workers >= 0 and timeout_s > 0, got {workers}, {timeout_s}")
        self._fn = load_reward_fn(spec)  # a bad spec fails here, not in the workers
        self.spec, self.workers, self.timeout_s = spec, workers, timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._started: Any = None
        self._started_at: dict[int, tuple[int, float]] = {}  # task -> (pid, time seen)
        self._killed: set[int] = set()
        # Tasks in flight when a worker died: each re-runs alone, so the next death names it.
        self._suspects: set[int] = set()

    def score(
        self, responses: list[str], answers: list[str], sources: list[str]
    ) -> tuple[list[float], dict[str, int]]:
        """Rewards in input order and {"reward_errors": n, "reward_timeouts": m}."""
        if not len(responses) == len(answers) == len(sources):
            raise ValueError(
                f"{len(responses)} responses, {len(answers)} answers, {len(sources)} sources"
            )
        samples = list(zip(responses, answers, sources, strict=True))
        if self.workers == 0:
            outcomes = [_score_one(self._fn, self.timeout_s, *s) for s in samples]
        else:
            outcomes = self._score_in_pool(samples)
        stats = {"reward_errors": 0, "reward_timeouts": 0}
        for _, status in outcomes:
            if status != "ok":
                stats[f"reward_{status}s"] += 1
        return [reward for reward, _ in outcomes], stats

    def _score_in_pool(self, samples: list[tuple[str, str, str]]) -> list[tuple[float, str]]:
        """At most `workers` tasks in flight, so that a worker's death implicates few."""
        outcomes: list[Any] = [None] * len(samples)
        pending = deque(range(len(samples)))
        running: dict[Future, int] = {}
        self._started_at.clear()
        self._killed.clear()
        self._suspects.clear()
        try:
            while pending or running:
                broken = False
                while pending and len(running) < self.workers:
                    solo = pending[0] in self._suspects or self._suspects & set(running.values())
                    if running and solo:
                        break
                    try:
                        running[self._submit(pending[0], samples[pending[0]])] = pending[0]
                    except BrokenProcessPool:
                        broken = True
                        break
                    pending.popleft()
                if not broken:
                    done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                    broken = any(isinstance(f.exception(), BrokenProcessPool) for f in done)
                if broken:
                    self._recover(running, outcomes, pending)
                    continue
                for fut in done:
                    outcomes[running.pop(fut)] = fut.result()
                self._kill_overdue(running.values())
        except BaseException:  # interrupted: leave no worker busy, start afresh next time
            if self._pool is not None:
                self._kill_overdue(running.values(), now=math.inf)
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            raise
        return outcomes

    def _submit(self, task: int, sample: tuple[str, str, str]) -> Future:
        if self._pool is None:
            # Not fork (this process has threads and CUDA); unlike spawn, a replacement worker
            # forks from a server that has imported the trainer's modules already.
            ctx = multiprocessing.get_context("forkserver")
            self._started = ctx.SimpleQueue()
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(self.spec, self.timeout_s, self._started),
            )
        return self._pool.submit(_worker_score, task, *sample)

    def _drain_started(self) -> None:
        while not self._started.empty():
            task, pid = self._started.get()
            self._started_at[task] = (pid, time.monotonic())

    def _kill_overdue(self, tasks: Iterable[int], now: float | None = None) -> None:
        """SIGKILL the workers of tasks past timeout_s + grace; the pool then breaks."""
        self._drain_started()
        now = time.monotonic() if now is None else now
        for task in tasks:
            pid, seen = self._started_at.get(task, (0, now))
            if pid and task not in self._killed and now - seen > self.timeout_s + _KILL_GRACE_S:
                self._killed.add(task)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _recover(
        self, running: dict[Future, int], outcomes: list[Any], pending: deque[int]
    ) -> None:
        """After a worker died: keep finished results, score the killed tasks as timeouts, name
        the culprit of a death when one task alone was running, re-queue the rest; new pool."""
        self._pool.shutdown(wait=True)  # the executor has ended the other workers
        self._pool = None
        self._drain_started()
        lost = []
        for fut, task in running.items():
            if fut.exception() is None:
                outcomes[task] = fut.result()
            elif task in self._killed:
                logger.warning("reward function hung past %.1f s; worker killed", self.timeout_s)
                outcomes[task] = (0.0, "timeout")
            else:
                lost.append(task)
        started = [t for t in lost if t in self._started_at]
        if lost and not started and not self._killed:
            raise RuntimeError(f"reward workers for {self.spec!r} died before scoring a sample")
        if len(started) == 1 and not self._killed:
            logger.warning("reward function ended its worker process; reward 0.0")
            outcomes[started[0]] = (0.0, "error")
            lost.remove(started[0])
        elif not self._killed:
            self._suspects.update(started)
        pending.extendleft(reversed(lost))
        running.clear()
        self._started_at.clear()
        self._killed.clear()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardComputer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
