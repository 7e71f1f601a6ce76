"""The actor: per-token log-probs/entropy and GRPO training passes through Megatron's pipeline
schedules, under any TP/PP/VPP/DP layout.

Every rank is handed the same global :class:`PolicyBatch`; the actor picks its data-parallel
rows itself, and returns results that are complete and identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from sfpo_megatron.config import Config
from sfpo_megatron.hf.load import HFCheckpoint, load_hf_weights
from sfpo_megatron.models.arch import ModelArch, padded_vocab_size
from sfpo_megatron.models.gpt import build_model
from sfpo_megatron.policy.batch import PolicyBatch
from sfpo_megatron.policy.losses import (
    LOSS_STATS,
    grpo_token_loss,
    vocab_parallel_logprob_entropy,
)
from sfpo_megatron.policy.micro_batches import Geometry, MicroBatch, Plan, plan_micro_batches
from sfpo_megatron.policy.optim import MasterWeights, build_optimizer, master_weights


def _real_tokens(outputs: list[torch.Tensor], micro_batches: list[MicroBatch]) -> torch.Tensor:
    """``[C, tokens]``: each micro-batch's ``[C, b * s]`` outputs cut to its rows' segments."""
    return torch.cat(
        [outputs[0][:, :0]]
        + [
            values[:, seg.start : seg.start + seg.length]
            for values, mb in zip(outputs, micro_batches, strict=True)
            for seg in mb.segments
        ],
        dim=1,
    )


class Actor:
    """Megatron-Core GPT policy with its (distributed) optimizer and LR schedule."""

    def __init__(self, cfg: Config, arch: ModelArch, chunks: list, optimizer, scheduler) -> None:
        self.cfg = cfg
        self.arch = arch
        self.chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        vocab = padded_vocab_size(arch.vocab_size, cfg.model.vocab_pad_multiple, tp)
        self.vocab_start = parallel_state.get_tensor_model_parallel_rank() * (vocab // tp)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._connect_schedule_hooks()

    @classmethod
    def build(cls, cfg: Config, arch: ModelArch, checkpoint: HFCheckpoint | None = None) -> Actor:
        """The model (weights from ``checkpoint`` if given, else random), optimizer, schedule."""
        chunks = build_model(cfg, arch)
        if checkpoint is not None:
            load_hf_weights(chunks, arch, checkpoint)
        optimizer, scheduler = build_optimizer(cfg, chunks)
        return cls(cfg, arch, chunks, optimizer, scheduler)

    def _connect_schedule_hooks(self) -> None:
        """What Megatron-LM's training loop wires into the model config for the schedules."""
        config = get_model_config(self.chunks[0])
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        if self.cfg.parallel.overlap_grad_reduce:
            no_sync = [chunk.no_sync for chunk in self.chunks]
            grad_sync = [chunk.start_grad_sync for chunk in self.chunks]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync

    # ------------------------------------------------------------------ schedule plumbing

    def _run_schedule(self, plan: Plan, loss_func, forward_only: bool) -> list:
        def forward_step(data_iterator: Iterator, model):
            mb = next(data_iterator)
            output = model(
                mb["tokens"],
                mb["position_ids"],
                None,
                packed_seq_params=mb.get("packed_seq_params"),
            )
            return output, partial(loss_func, mb)

        inputs = [mb.inputs for mb in plan.micro_batches]
        iterators = [iter(inputs) for _ in self.chunks]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=len(inputs),
            seq_length=plan.seq_length,
            micro_batch_size=plan.micro_batch_size,
            forward_only=forward_only,
        )

    def _logprob_entropy(self, mb: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float() / self.cfg.rollout.temperature
        return vocab_parallel_logprob_entropy(
            logits, mb["targets"], self.vocab_start, self.arch.vocab_size, self.tp_group
        )

    def plan(self, batch: PolicyBatch, packing: bool | None = None) -> Plan:
        """How ``batch`` is cut into this rank's micro-batches (``packing``: None =
        ``train.packing``)."""
        t, p = self.cfg.train, self.cfg.parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        geometry = Geometry(
            packing=t.packing if packing is None else packing,
            token_budget=self.cfg.token_budget,
            micro_batch_size=t.micro_batch_size,
            data_parallel=self.dp_size,
            data_parallel_rank=self.dp_rank,
            sequence_multiple=tp if p.sequence_parallel else 1,
            pipelined=p.pipeline > 1,
            micro_batch_multiple=p.pipeline if p.interleaved else 1,
        )
        return plan_micro_batches(batch, geometry, self.device)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast a last-pipeline-stage result to every stage."""
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                tensor,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return tensor

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def forward_logprobs(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of every token under the current policy, ``[N, S]`` each,
        aligned with ``batch.tokens`` and zero outside ``response_mask``."""
        plan = self.plan(batch)
        for chunk in self.chunks:
            chunk.eval()

        def collect(mb, logits):
            logprob, entropy = self._logprob_entropy(mb, logits)
            no_tokens = torch.zeros((), dtype=torch.int)
            return logits.new_zeros(()), no_tokens, torch.stack([logprob, entropy]).flatten(1)

        outputs = self._run_schedule(plan, collect, forward_only=True)
        mine = sum(plan.lengths[row] for rows in plan.groups[self.dp_rank] for row in rows)
        local = torch.zeros(2, mine, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            local = _real_tokens(outputs, plan.micro_batches)
        shifted = self._gather_rows(plan, self._from_last_stage(local.contiguous()), batch)
        aligned = torch.nn.functional.pad(shifted[..., :-1], (1, 0))[..., : batch.seq_length]
        aligned = aligned * batch.response_mask.to(self.device)
        return aligned[0].cpu(), aligned[1].cpu()

    def _gather_rows(self, plan: Plan, local: torch.Tensor, batch: PolicyBatch) -> torch.Tensor:
        """``[C, N, W]``: every data-parallel rank's per-row outputs (``local``: this rank's,
        its rows' tokens end to end in plan order), zero past each row's carried tokens."""
        channels = local.size(0)
        width = max(max(plan.lengths), batch.seq_length)
        index = [
            torch.cat(
                [row * width + torch.arange(plan.lengths[row]) for rows in groups for row in rows]
                or [torch.zeros(0, dtype=torch.long)]
            )
            for groups in plan.groups
        ]
        size = max(len(i) for i in index)
        gathered = torch.empty(self.dp_size * channels, size, device=self.device)
        padded = torch.nn.functional.pad(local, (0, size - local.size(1)))
        dist.all_gather_into_tensor(
            gathered, padded.contiguous(), group=parallel_state.get_data_parallel_group()
        )
        gathered = gathered.view(self.dp_size, channels, size)
        out = torch.zeros(channels, batch.num_sequences * width, device=self.device)
        for rank, rank_index in enumerate(index):
            out.index_copy_(1, rank_index.to(self.device), gathered[rank, :, : len(rank_index)])
        return out.view(channels, batch.num_sequences, width)

    def train_pass(
        self, batch: PolicyBatch, before_step: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """One pass over ``batch``: each mini-batch (in order, unshuffled) is one optimizer step
        on the token-mean GRPO loss. Returns metrics averaged over the pass's tokens/steps.

        ``before_step`` runs before every optimizer step (SFPO waits there for its snapshot).
        """
        if batch.advantages is None or batch.old_logprobs is None:
            raise ValueError("a training pass needs advantages and old_logprobs in the batch")
        mini = self.cfg.sequences_per_mini_batch
        if batch.num_sequences % mini:
            raise ValueError(
                f"a batch of {batch.num_sequences} sequences does not split into mini-batches of "
                f"train.mini_batch_prompts x train.samples_per_prompt = {mini}"
            )
        for chunk in self.chunks:
            chunk.train()
        sums = torch.zeros(len(LOSS_STATS) + 2, dtype=torch.float64, device=self.device)
        grad_norms, steps = [], 0
        for start in range(0, batch.num_sequences, mini):
            stats, grad_norm = self._optimizer_step(batch.rows(start, start + mini), before_step)
            sums += stats
            grad_norms.append(grad_norm)
            steps += 1
        sums = self._from_last_stage(sums)
        tokens = max(sums[-2].item(), 1.0)
        metrics = {name: sums[i].item() / tokens for i, name in enumerate(LOSS_STATS)}
        metrics["grad_norm"] = sum(grad_norms) / steps
        metrics["tokens"] = sums[-2].item()
        metrics["processed_tokens"] = sums[-1].item()
        metrics["optimizer_steps"] = steps
        return metrics

    def _optimizer_step(
        self, mini_batch: PolicyBatch, before_step: Callable[[], None] | None
    ) -> tuple[torch.Tensor, float]:
        def loss_func(mb, logits):
            logprob, entropy = self._logprob_entropy(mb, logits)
            token_loss, stats = grpo_token_loss(
                logprob,
                mb["old_logprobs"],
                mb["advantages"],
                entropy,
                self.cfg.algorithm,
                mb.get("ref_logprobs"),
                mb.get("rollout_weights"),
            )
            mask = mb["mask"]
            tokens = mask.sum()
            reported = torch.stack([(stats[name] * mask).sum() for name in LOSS_STATS] + [tokens])
            return (token_loss * mask).sum(), tokens.int(), reported.double()

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        plan = self.plan(mini_batch)
        outputs = self._run_schedule(plan, loss_func, forward_only=False)
        if before_step is not None:
            before_step()
        succeeded, grad_norm, _ = self.optimizer.step()
        if not succeeded:
            raise FloatingPointError("optimizer step skipped: inf/NaN gradients (fp16 overflow?)")
        stats = torch.zeros(len(LOSS_STATS) + 2, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            processed = stats.new_tensor([plan.processed_tokens])
            stats = torch.cat([torch.stack(outputs).sum(dim=0), processed])
            dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        return stats, float(grad_norm)

    def master_weights(self) -> MasterWeights:
        """This rank's fp32 master-weight shard and the model-param slices it feeds."""
        return master_weights(self.optimizer)

    def publish_master_weights(self) -> None:
        """After master weights were changed outside an optimizer step (and their model-param
        slices written): make every data-parallel rank's model params whole again, the way
        the distributed optimizer's own step does (at once, or lazily at the next forward
        when the param all-gather is overlapped)."""
        for chunk in self.chunks:
            ddp = chunk.ddp_config
            if ddp.use_distributed_optimizer and not ddp.overlap_param_gather:
                chunk.start_param_sync()

    def step_lr(self) -> None:
        """Advance the LR schedule by one RL iteration."""
        self.scheduler.step(increment=1)
