"""The default rollout engine: the policy in this process (:mod:`~sfpo_megatron.rollout.decoder`),
fed by the export stream, so one machine needs no inference server and the log-probs it
reports are the actor's quantity (log_softmax(logits / temperature), fp32)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path

import torch

from sfpo_megatron.common.samples import NO_WEIGHTS, Bucket, Sample, SamplingParams
from sfpo_megatron.config import RolloutConfig
from sfpo_megatron.hf.fp8 import dequantize_bucket
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.rollout.batching import Decoded, Row, decode_rows
from sfpo_megatron.rollout.decoder import EngineWeights, SlotDecoder
from sfpo_megatron.rollout.sampler import row_key


class EmbeddedEngine:
    """A :class:`~sfpo_megatron.common.samples.RolloutEngine` for the model of ``hf_dir``'s
    config.json. No checkpoint is read: weights arrive only through :meth:`update_weights`
    (the export stream), so construction allocates without initialising.

    Rows are decoded with continuous batching in as many KV-cache slots as ``kv_cache_gb``
    holds; on CUDA each decode step is a replayed CUDA graph unless ``cuda_graphs`` is false.
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
        self.decoder = SlotDecoder(self.arch, self.weights, cuda_graphs)
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

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, first_prompt: int = 0
    ) -> list[Sample]:
        """``params.n`` independent samples per prompt, prompt-major. Sample ``j`` of
        ``prompts[i]`` draws with the key of (seed, ``first_prompt + i``, ``j``), so an engine
        given a slice of a batch (``first_prompt`` = where it starts) samples what one engine
        given the whole batch would."""
        self._check_prompts(prompts)
        seed = secrets.randbits(63) if params.seed is None else params.seed
        rows = [
            Row(prompt, row_key(seed, first_prompt + index, sample), params.max_new_tokens)
            for index, prompt in enumerate(prompts)
            for sample in range(params.n)
        ]
        version = self._version
        return [
            Sample(
                prompt_index=index // params.n,
                prompt_ids=list(row.prompt),
                output_ids=decoded.tokens,
                output_logprobs=decoded.logprobs,
                finish_reason="stop" if decoded.stopped else "length",
                weight_version=version,
            )
            for index, (row, decoded) in enumerate(
                zip(rows, self.decode(rows, params), strict=True)
            )
        ]

    @torch.no_grad()
    def decode(
        self, rows: list[Row], params: SamplingParams, continuous: bool = True
    ) -> list[Decoded]:
        """Generate ``rows`` (each with its own key and budget) with as many KV-cache slots as
        ``kv_cache_gb`` holds; ``continuous=False`` is the static baseline (see
        :mod:`~sfpo_megatron.rollout.batching`)."""
        if not self.health():
            raise RuntimeError("generate: no weights loaded yet; call update_weights first")
        if self.weights.released:
            raise RuntimeError("generate: memory is released; call resume_memory first")
        if not rows:
            return []
        positions = max(len(r.prompt) + r.budget for r in rows)
        return decode_rows(self.decoder, rows, params, self.slots(positions), continuous)

    def slots(self, positions: int) -> int:
        """KV-cache slots of ``positions`` positions that fit the budget (at least one)."""
        return max(1, int(self._kv_cache_bytes // self.decoder.kv_bytes(1, positions)))

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"generate: prompt {index} is empty")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"generate: prompt {index} has token ids outside [0, {self.vocab_size}): "
                    f"{bad[:5]}"
                )
