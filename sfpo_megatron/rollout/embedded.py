"""The default rollout engine: the policy in this process (:mod:`~sfpo_megatron.rollout.decoder`),
fed by the export stream, so one machine needs no inference server and the log-probs it
reports are the actor's quantity (log_softmax(logits / temperature), fp32)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from sfpo_megatron.common.samples import NO_WEIGHTS, Bucket, Sample, SamplingParams
from sfpo_megatron.config import RolloutConfig
from sfpo_megatron.hf.fp8 import dequantize_bucket
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.rollout.decoder import EngineWeights, StaticDecoder

STOP_CHECK_STEPS = 16
"""Decode steps between checks whether every row has stopped (each check waits for the device)."""


class EmbeddedEngine:
    """A :class:`~sfpo_megatron.common.samples.RolloutEngine` for the model of ``hf_dir``'s
    config.json. No checkpoint is read: weights arrive only through :meth:`update_weights`
    (the export stream), so construction allocates without initialising.

    Rows are decoded together, in groups whose KV cache fits ``kv_cache_gb``; on CUDA each
    decode step is a replayed CUDA graph unless ``cuda_graphs`` is false.
    ``release_memory`` / ``resume_memory`` move the weights to the host and back on CUDA and
    free the KV cache; on other devices they do nothing.
    """

    def __init__(
        self,
        hf_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        kv_cache_gb: float = RolloutConfig.kv_cache_gb,
        cuda_graphs: bool = RolloutConfig.cuda_graphs,
    ) -> None:
        self.device = torch.device(device)
        self.arch = read_hf_config(hf_dir)
        self.weights = EngineWeights(self.arch, self.device, dtype)
        self.decoder = StaticDecoder(self.arch, self.weights, cuda_graphs)
        self.vocab_size = self.arch.vocab_size
        self._kv_cache_bytes = kv_cache_gb * 2**30
        self._version = NO_WEIGHTS

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Copy every parameter from ``buckets``, each exactly once, then take ``version``.
        Until it succeeds the engine refuses to sample (a failure leaves weights half-new).
        Released memory is taken back first (without restoring what every tensor replaces).
        fp8 weights (with their ``weight_scale_inv``) are dequantized and kept in the engine's
        dtype: the CPU path; no fp8 GEMMs here yet."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        self._version = NO_WEIGHTS
        if self.weights.released:
            self.weights.resume(restore=False)
        seen: set[str] = set()
        with torch.no_grad():
            for bucket in buckets:
                bucket = dequantize_bucket(bucket, torch.float32, self.device)
                self._check_bucket(bucket, seen)
                for name, tensor in bucket:
                    self.weights.views[name].copy_(tensor)
                    seen.add(name)
        missing = sorted(self.weights.views.keys() - seen)
        if missing:
            raise ValueError(f"update_weights: tensors missing from the stream: {missing}")
        self._version = version

    def _check_bucket(self, bucket: Bucket, seen: set[str]) -> None:
        """Refuse a bucket with unknown, repeated or misshaped tensors before copying any."""
        names = [name for name, _ in bucket]
        views = self.weights.views
        unknown = [n for n in names if n not in views]
        if unknown:
            tied = self.arch.tie_word_embeddings and "lm_head.weight" in unknown
            hint = " (lm_head.weight is tied to model.embed_tokens.weight: send only the latter)"
            hint = hint if tied else ""
            raise ValueError(f"update_weights: unknown tensors {unknown}{hint}")
        repeated = sorted({n for n in names if n in seen or names.count(n) > 1})
        if repeated:
            raise ValueError(f"update_weights: tensors sent more than once: {repeated}")
        for name, tensor in bucket:
            expected = tuple(views[name].shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {expected}"
                )

    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return self._version != NO_WEIGHTS

    def release_memory(self) -> None:
        """Free the KV cache and move the weights to the host (CUDA only: no-op elsewhere)."""
        if self.device.type != "cuda" or self.weights.released:
            return
        self.decoder.drop_cache()
        self.weights.release()
        torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if self.weights.released:
            self.weights.resume()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """``params.n`` independent samples per prompt, prompt-major; the rows are decoded
        together as left-padded groups within the KV budget (a seed reproduces the samples of
        the same prompts, weights and budget)."""
        if not self.health():
            raise RuntimeError("generate: no weights loaded yet; call update_weights first")
        if self.weights.released:
            raise RuntimeError("generate: memory is released; call resume_memory first")
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"generate: prompt {index} is empty")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"generate: prompt {index} has token ids outside [0, {self.vocab_size}): "
                    f"{bad[:5]}"
                )
        rows = [prompts[index] for index in range(len(prompts)) for _ in range(params.n)]
        if not rows:
            return []
        version = self._version
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        samples = []
        group = self._rows_per_group(max(map(len, prompts)) + params.max_new_tokens)
        for begin in range(0, len(rows), group):
            decoded = self._decode(rows[begin : begin + group], params, generator)
            for offset, (tokens, logprobs, stopped) in enumerate(zip(*decoded, strict=True)):
                samples.append(
                    Sample(
                        prompt_index=(begin + offset) // params.n,
                        prompt_ids=list(rows[begin + offset]),
                        output_ids=tokens,
                        output_logprobs=logprobs,
                        finish_reason="stop" if stopped else "length",
                        weight_version=version,
                    )
                )
        return samples

    def _rows_per_group(self, positions: int) -> int:
        """Rows whose KV cache of ``positions`` positions fits the budget (at least one)."""
        return max(1, int(self._kv_cache_bytes // self.decoder.kv_bytes(1, positions)))

    @torch.no_grad()
    def _decode(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """Prefill, then one token per step for every row until all rows stopped or reached
        ``max_new_tokens``. Returns per-row tokens and log-probs (cut after a stop token) and
        whether a stop token ended the row."""
        batch, steps = len(prompts), params.max_new_tokens
        stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        out_tokens = torch.zeros(batch, steps, dtype=torch.long, device=self.device)
        out_logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=self.device)
        lengths = torch.full((batch,), steps, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)

        logits = self.decoder.prefill(prompts, steps)
        for step in range(steps):
            token, logprob = sample_token(logits, params, generator)
            out_tokens[:, step], out_logprobs[:, step] = token, logprob
            stopped_now = ~done & torch.isin(token, stops)
            lengths.masked_fill_(stopped_now, step + 1)
            done |= stopped_now
            if step + 1 == steps or ((step + 1) % STOP_CHECK_STEPS == 0 and bool(done.all())):
                break
            logits = self.decoder.step(token)
        lengths, stopped = lengths.tolist(), done.tolist()
        tokens = [row[:n] for row, n in zip(out_tokens.tolist(), lengths, strict=True)]
        logprobs = [row[:n] for row, n in zip(out_logprobs.tolist(), lengths, strict=True)]
        return tokens, logprobs, stopped


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``logits`` [batch, vocab]: temperature, then top-k, then top-p,
    then a draw. The log-prob returned is over the full vocabulary (before truncation), in
    fp32, as the actor computes it."""
    scaled = logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.shape[-1]:
        top = scaled.topk(params.top_k, dim=-1).indices
        keep = torch.zeros_like(keep).scatter_(-1, top, True)
    if params.top_p < 1:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token is dropped when the more likely ones already reach top_p (never the first).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        keep &= ~torch.zeros_like(keep).scatter_(-1, order, drop_sorted)
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
