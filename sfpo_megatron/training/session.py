"""Everything one training run holds, built in one place: the actor and its update, the
reference policy, prompts, the rollout engine and reward processes (rank 0), metrics,
checkpoints; and what happens between iterations (sync, evaluation, saving, resuming)."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from sfpo_megatron.algorithms import build_update
from sfpo_megatron.algorithms.warm_start import warm_start
from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.common.samples import SamplingParams
from sfpo_megatron.config import SEEDS_PER_ITERATION, Config
from sfpo_megatron.data.prompts import (
    Encoder,
    PromptSet,
    chat_template_encoder,
    load_prompts,
    load_tokenizer,
)
from sfpo_megatron.data.rewards import RewardComputer, load_reward_fn
from sfpo_megatron.data.tokenizer_check import check_tokenizer
from sfpo_megatron.hf.export import save_hf
from sfpo_megatron.hf.load import HFCheckpoint
from sfpo_megatron.models.arch import ModelArch, hf_directory
from sfpo_megatron.policy.actor import Actor
from sfpo_megatron.policy.kl_reference import ReferencePolicy
from sfpo_megatron.rollout.scoring import RolloutScorer, check_reward_fn, retried
from sfpo_megatron.training.metrics import MetricsLog
from sfpo_megatron.training.rollout_backend import build_backend
from sfpo_megatron.training.stop_request import StopRequest
from sfpo_megatron.training.train_checkpoint import (
    CheckpointManager,
    checkpoint_dir,
    holds_reference,
    latest_complete,
    load_checkpoint,
)

EVAL_SLOT = SEEDS_PER_ITERATION - 1
"""The seed slot of an iteration's evaluation; training rounds use the slots below it."""


def sampling_seed(data_seed: int, iteration: int, slot: int) -> int:
    """The sampling seed of one round (``slot`` = its index) or of the evaluation
    (:data:`EVAL_SLOT`) of ``iteration``: distinct for every (iteration, slot), and a function
    of nothing else, so a resumed run draws the same samples as an uninterrupted one."""
    return data_seed * 1_000_003 + iteration * SEEDS_PER_ITERATION + slot


class Session:
    """Open with :meth:`open` (a context manager); ``iteration`` is the last one completed."""

    def __init__(self, cfg: Config, arch: ModelArch, checkpoint: HFCheckpoint | None) -> None:
        self.cfg, self.arch = cfg, arch
        self.rank0 = dist.get_rank() == 0
        self._resources = ExitStack()
        try:  # on every rank, so a bad spec stops all of them at once
            reward_fn = load_reward_fn(cfg.reward.fn)
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            raise ConfigError(f"reward.fn: {error}") from error
        tokenizer_dir = cfg.data.tokenizer or str(hf_directory(cfg.model.hf_config))
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {tokenizer.name_or_path} has no eos token")
        self.tokenizer = tokenizer
        encode = chat_template_encoder(tokenizer, cfg.data.use_chat_template)
        if not cfg.data.train_files:
            raise ConfigError("data.train_files must list at least one JSONL or Parquet file")
        self.prompts = self._prompt_set("train", cfg.data.train_files, encode)
        self.eval_items = []
        if cfg.eval.files:
            eval_set = self._prompt_set("eval", cfg.eval.files, encode)
            self.eval_items = [
                (i, eval_set.token_ids[i], eval_set.records[i]) for i in range(len(eval_set))
            ]
        self._encode = encode
        check_tokenizer(tokenizer, tokenizer_dir, arch.vocab_size, self.prompts)
        check_reward_fn(cfg.reward.fn, reward_fn, cfg.reward.timeout_s, self.prompts.records[0])

        self.actor = Actor.build(cfg, arch, checkpoint)
        # The model as built; replaced by the warm-started weights, or by a checkpoint's.
        self.reference = ReferencePolicy(self.actor) if cfg.algorithm.kl_coef > 0 else None
        self.update = build_update(cfg.algorithm, self.actor)
        self.rollout = build_backend(cfg, arch, self.actor.device)
        self._resources.callback(self.rollout.close)
        rewards = None
        if self.rank0:
            rewards = self._resources.enter_context(
                RewardComputer(cfg.reward.fn, cfg.reward.workers, cfg.reward.timeout_s)
            )
        self.scorer = RolloutScorer(
            self.rollout.engine, self._decode if self.rank0 else None, rewards, self._recover
        )
        self.checkpoints = (
            CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.async_save)
            if cfg.checkpoint.dir
            else None
        )
        self.iteration = 0
        self.rollouts = 0  # training samples generated so far (every round; no evaluation)
        self.best: dict[str, float] | None = None
        # Last: nothing raises after it, so its signal handlers are always given back.
        self.stop_request = StopRequest(cfg.checkpoint, self.actor.device)
        self._resources.callback(self.stop_request.close)
        self.stopping = False

    def _prompt_set(self, role: str, files: list[str], encode: Encoder) -> PromptSet:
        d = self.cfg.data
        records, counts = load_prompts(
            files, d.prompt_key, d.answer_key, d.source_key, d.skip_malformed, d.require_answer
        )
        prompts = PromptSet(records, encode, d.max_prompt_length, d.seed)
        if self.rank0:
            print(
                f"{role} prompts from {', '.join(files)}: {len(prompts)} of "
                f"{counts['rows_read']} rows ({counts['malformed_skipped']} malformed skipped, "
                f"{prompts.dropped_too_long} "
                f"longer than data.max_prompt_length={d.max_prompt_length} dropped)",
                flush=True,
            )
        return prompts

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_answer(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @classmethod
    def open(cls, cfg: Config, arch: ModelArch, checkpoint: HFCheckpoint | None) -> Session:
        session = cls(cfg, arch, checkpoint)
        try:
            session._begin()
        except BaseException:
            session.close()
            raise
        return session

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.finalize()
        self._resources.close()

    # ------------------------------------------------------------------ start / resume

    def _begin(self) -> None:
        resume = self._resume_path()
        t = self.cfg.train
        if resume is not None:
            self._load(resume)
        elif t.warm_start_steps:
            warm_start(
                self.actor,
                self.prompts.with_seed(self.cfg.data.seed + 1),
                self._encode_answer,
                self.tokenizer.eos_token_id,
                t.warm_start_steps,
                t.warm_start_lr if t.warm_start_lr is not None else self.cfg.optimizer.lr,
            )
            if self.reference is not None:
                self.reference.capture()  # the KL reference is the policy RL starts from
        self.log = MetricsLog(
            self.cfg.logging, self.cfg.train.iterations, self.cfg.to_dict(), self.iteration
        )
        self._resources.callback(self.log.close)
        self.sync(version=self.iteration)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return None
        path = latest_complete(self.cfg.checkpoint.dir) if resume == "auto" else Path(resume)
        if path is not None and self.rank0:
            print(f"resuming from {path}", flush=True)
        return path

    def _load(self, path: Path) -> None:
        """Everything from the checkpoint; the KL reference too where it stores one (it was
        warm-started), else the reference stays the model as built."""
        reference = None
        if self.reference is not None and holds_reference(path):
            reference = self.reference
        elif self.reference is not None and self.cfg.train.warm_start_steps:
            raise ConfigError(
                f"checkpoint {path} holds no KL reference policy, but with "
                f"algorithm.kl_coef > 0 and train.warm_start_steps > 0 the reference is the "
                f"warm-started policy, which only the checkpoint can give back: resume with "
                f"the config that wrote it"
            )
        state = load_checkpoint(path, self.actor, reference)
        self.iteration = state["iteration"]
        self.rollouts = state["rollouts"]
        self.prompts.load_state_dict(state["data"])
        self.update.load_state_dict(state["update"])
        self.best = state["best"]

    def _state(self) -> dict:
        return {
            "iteration": self.iteration,
            "rollouts": self.rollouts,
            "data": self.prompts.state_dict(),
            "update": self.update.state_dict(),
            "best": self.best,
        }

    def _stored_reference(self) -> ReferencePolicy | None:
        """The KL reference when a resumed run could not rebuild it (it is not as built)."""
        if self.reference is None or self.reference.as_built:
            return None
        return self.reference

    # ------------------------------------------------------------------ per iteration

    def sampling(self, iteration: int, round_index: int) -> SamplingParams:
        """Training rollouts' sampling; the seed depends only on (data.seed, iteration, round),
        so a resumed run draws the same samples as an uninterrupted one."""
        r = self.cfg.rollout
        return SamplingParams(
            n=self.cfg.train.samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_length,
            stop_token_ids=(self.tokenizer.eos_token_id,),
            seed=sampling_seed(self.cfg.data.seed, iteration, round_index),
        )

    def sync(self, version: int) -> None:
        """Push the actor's weights into the engine (collective)."""
        retried(lambda: self.rollout.sync(self.actor.chunks, version), self._restarted)

    def release_rollout_memory(self) -> None:
        """Before training: the engine's accelerator memory goes to the actor (collective)."""
        retried(self.rollout.release, self._restarted)

    def _restarted(self) -> bool:
        """After a rollout failure (collective): whether a dead server was restarted."""
        if not self.rollout.recover():
            return False
        if self.rank0:
            print("a rollout server died and was restarted", flush=True)
        return True

    def _recover(self) -> bool:
        """After a failed batch (collective): restart dead servers and give them the current
        weights; True when the batch may be sampled again."""
        if not self._restarted():
            return False
        self.sync(version=self.iteration)
        return True

    def after_iteration(self, iteration: int) -> dict[str, float]:
        """Evaluation and checkpoint due after ``iteration``; returns their metrics. Asks all
        ranks whether to stop (``stopping``): then the checkpoint is due too."""
        self.iteration = iteration
        metrics: dict[str, float] = {}
        e, last = self.cfg.eval, iteration == self.cfg.train.iterations
        if e.interval and (iteration % e.interval == 0 or last):
            clock = time.perf_counter()
            metrics.update(self.evaluate(iteration))
            metrics["time_eval"] = time.perf_counter() - clock
        self.stopping = self.stop_request.agreed() and not last  # the last iteration just finishes
        c = self.cfg.checkpoint
        due = (c.interval and iteration % c.interval == 0) or last or self.stopping
        if self.checkpoints is not None and due:
            clock = time.perf_counter()
            self.checkpoints.save(iteration, self.actor, self._state(), self._stored_reference())
            metrics["time_checkpoint"] = time.perf_counter() - clock
        return metrics

    def stop_early(self, iteration: int) -> NoReturn:
        """On every rank once ``stopping`` (its metrics logged): complete the checkpoint of
        ``iteration`` and raise :class:`~sfpo_megatron.training.stop_request.StopRequested`."""
        saved = None
        if self.checkpoints is not None:
            self.checkpoints.finalize()
            saved = checkpoint_dir(self.checkpoints.root, iteration)
        self.stop_request.end_run(iteration, self.cfg.train.iterations, saved)

    def evaluate(self, iteration: int) -> dict[str, float]:
        e = self.cfg.eval
        params = SamplingParams(
            n=e.k,
            temperature=e.temperature,
            top_p=e.top_p,
            max_new_tokens=self.cfg.rollout.max_response_length,
            stop_token_ids=(self.tokenizer.eos_token_id,),
            seed=sampling_seed(self.cfg.data.seed, iteration, EVAL_SLOT),
        )
        result = self.scorer.evaluate(self.eval_items, params, self.cfg.train.prompts_per_step)
        if self.best is None or result["eval/macro"] > self.best["eval/macro"]:
            self.best = {"iteration": iteration, "eval/macro": result["eval/macro"]}
            if self.rank0:
                out = Path(self.cfg.logging.output_dir) / "best.json"
                out.write_text(json.dumps(self.best) + "\n")
        return result

    def finish(self) -> None:
        """At the end: the HF export if configured (the last checkpoint was saved already); a
        stop file that came too late to matter is removed."""
        self.stop_request.forget()
        c = self.cfg.checkpoint
        if c.export_hf_dir:
            save_hf(
                self.actor.chunks,
                self.arch,
                hf_directory(self.cfg.model.hf_config),
                c.export_hf_dir,
                c.export_shard_mb,
            )
