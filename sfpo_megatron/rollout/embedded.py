"""The default rollout engine: a transformers model in this process, fed by the export stream,
sampling with its own KV-cache decode loop, so one machine needs no inference server and the
log-probs it reports are exactly the actor's (log_softmax(logits / temperature), fp32)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from sfpo_megatron.rollout.base import NO_WEIGHTS, Bucket, Sample, SamplingParams


class EmbeddedEngine:
    """A :class:`~sfpo_megatron.rollout.base.RolloutEngine` on a transformers causal LM built
    from ``hf_dir``'s config.json. No checkpoint is read: weights arrive only through
    :meth:`update_weights` (the export stream), so construction allocates without initialising.

    ``release_memory`` / ``resume_memory`` move the weights to the host and back on CUDA; on
    other devices they do nothing. The KV cache lives only inside one ``generate`` call.
    """

    def __init__(
        self,
        hf_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(hf_dir)
        with torch.device(self.device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # Tying happens in the weight init that no_init_weights skips: restore it by hand.
        model.tie_weights()
        self.model = model.eval().requires_grad_(False)
        self._params = dict(model.named_parameters())
        self._aliases = {
            name: next(n for n, p in self._params.items() if p is param)
            for name, param in model.named_parameters(remove_duplicate=False)
            if name not in self._params
        }
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._version = NO_WEIGHTS
        self._released = False

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Copy every parameter from ``buckets``, each exactly once, then take ``version``.
        Until it succeeds the engine refuses to sample (a failure leaves weights half-new)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        self._version = NO_WEIGHTS
        seen: set[str] = set()
        with torch.no_grad():
            for bucket in buckets:
                self._check_bucket(bucket, seen)
                for name, tensor in bucket:
                    self._params[name].copy_(tensor)
                    seen.add(name)
        missing = sorted(self._params.keys() - seen)
        if missing:
            raise ValueError(f"update_weights: tensors missing from the stream: {missing}")
        self._version = version

    def _check_bucket(self, bucket: Bucket, seen: set[str]) -> None:
        """Refuse a bucket with unknown, repeated or misshaped tensors before copying any."""
        names = [name for name, _ in bucket]
        unknown = [n for n in names if n not in self._params]
        if unknown:
            tied = [f"{n} is tied to {self._aliases[n]}" for n in unknown if n in self._aliases]
            hint = f" ({'; '.join(tied)}: send only the latter)" if tied else ""
            raise ValueError(f"update_weights: unknown tensors {unknown}{hint}")
        repeated = sorted({n for n in names if n in seen or names.count(n) > 1})
        if repeated:
            raise ValueError(f"update_weights: tensors sent more than once: {repeated}")
        for name, tensor in bucket:
            expected = tuple(self._params[name].shape)
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
        """Move the weights to the host and return the cached blocks to CUDA (no-op elsewhere)."""
        if self.device.type != "cuda" or self._released:
            return
        self.model.to("cpu")
        torch.cuda.empty_cache()
        self._released = True

    def resume_memory(self) -> None:
        if not self._released:
            return
        self.model.to(self.device)
        self._released = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """``params.n`` independent samples per prompt, prompt-major; all rows of all prompts
        are decoded as one left-padded batch (a seed reproduces samples for the same batch)."""
        if not self.health():
            raise RuntimeError("generate: no weights loaded yet; call update_weights first")
        if self._released:
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
        rows = [index for index in range(len(prompts)) for _ in range(params.n)]
        if not rows:
            return []
        version = self._version
        tokens, logprobs, lengths, stopped = self._decode([prompts[i] for i in rows], params)
        return [
            Sample(
                prompt_index=index,
                prompt_ids=list(prompts[index]),
                output_ids=tokens[row][: lengths[row]],
                output_logprobs=logprobs[row][: lengths[row]],
                finish_reason="stop" if stopped[row] else "length",
                weight_version=version,
            )
            for row, index in enumerate(rows)
        ]

    @torch.inference_mode()
    def _decode(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]], list[int], list[bool]]:
        """Prefill the left-padded batch, then one token per step for every row until all
        rows stopped or reached ``max_new_tokens``. Returns per-row tokens, log-probs (both
        ``max_new_tokens`` long), the valid length and whether a stop token ended it."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        steps = params.max_new_tokens
        out_tokens = torch.zeros(batch, steps, dtype=torch.long, device=self.device)
        out_logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=self.device)
        lengths = torch.full((batch,), steps, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)

        cache, inputs = None, tokens
        for step in range(steps):
            out = self.model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            token, logprob = sample_token(out.logits[:, -1], params, generator)
            out_tokens[:, step], out_logprobs[:, step] = token, logprob
            stopped_now = ~done & torch.isin(token, stops)
            lengths[stopped_now] = step + 1
            done |= stopped_now
            if step + 1 == steps or bool(done.all()):
                break
            inputs = token[:, None]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
        return out_tokens.tolist(), out_logprobs.tolist(), lengths.tolist(), done.tolist()


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
