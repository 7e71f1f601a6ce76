"""A single-process, plain-PyTorch implementation of the actor, written independently of
sfpo_megatron so the Megatron path can be checked against it.

Weights use the full-state convention of tests/full_state.py: Megatron names,
global layer indices, fused QKV interleaved by query group ([q heads of group g; k_g; v_g]),
fused fc1 = [gate; up], unpadded vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_full_state(arch, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights in full-state layout (norm weights near 1, biases small)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=std):
        return torch.randn(*shape, generator=g) * scale

    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
    state = {"embedding.word_embeddings.weight": rand(arch.vocab_size, h, scale=0.2)}
    for layer in range(arch.num_layers):
        p = f"decoder.layers.{layer}."
        state[p + "input_layernorm.weight"] = 1.0 + rand(h, scale=0.1)
        state[p + "self_attention.linear_qkv.weight"] = rand(qkv_rows, h)
        if arch.qkv_bias:
            state[p + "self_attention.linear_qkv.bias"] = rand(qkv_rows, scale=0.1)
        if arch.qk_norm:
            state[p + "self_attention.q_layernorm.weight"] = 1.0 + rand(hd, scale=0.1)
            state[p + "self_attention.k_layernorm.weight"] = 1.0 + rand(hd, scale=0.1)
        state[p + "self_attention.linear_proj.weight"] = rand(h, arch.num_attention_heads * hd)
        state[p + "pre_mlp_layernorm.weight"] = 1.0 + rand(h, scale=0.1)
        state[p + "mlp.linear_fc1.weight"] = rand(2 * ffn, h)
        state[p + "mlp.linear_fc2.weight"] = rand(h, ffn)
    state["decoder.final_layernorm.weight"] = 1.0 + rand(h, scale=0.1)
    if not arch.tie_word_embeddings:
        state["output_layer.weight"] = rand(arch.vocab_size, h, scale=0.2)
    return state


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, inv_freq):
    # x: [N, S, heads, hd]; rotate-half RoPE with positions 0..S-1
    pos = torch.arange(x.shape[1], dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def logits(state, arch, tokens: torch.Tensor) -> torch.Tensor:
    """[N, S, vocab] logits of the reference model."""
    n, s = tokens.shape
    heads, groups, hd = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    per_group = heads // groups
    dim = hd
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
    x = state["embedding.word_embeddings.weight"][tokens]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer in range(arch.num_layers):
        p = f"decoder.layers.{layer}."
        y = _rms(x, state[p + "input_layernorm.weight"], arch.norm_eps)
        qkv = y @ state[p + "self_attention.linear_qkv.weight"].T
        if arch.qkv_bias:
            qkv = qkv + state[p + "self_attention.linear_qkv.bias"]
        qkv = qkv.view(n, s, groups, per_group + 2, hd)
        q = qkv[:, :, :, :per_group].reshape(n, s, heads, hd)
        k = qkv[:, :, :, per_group]
        v = qkv[:, :, :, per_group + 1]
        if arch.qk_norm:
            q = _rms(q, state[p + "self_attention.q_layernorm.weight"], arch.norm_eps)
            k = _rms(k, state[p + "self_attention.k_layernorm.weight"], arch.norm_eps)
        q, k = _rotate(q, inv_freq), _rotate(k, inv_freq)
        k = k.repeat_interleave(per_group, dim=2)
        v = v.repeat_interleave(per_group, dim=2)
        scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v).reshape(n, s, heads * hd)
        x = x + attn @ state[p + "self_attention.linear_proj.weight"].T
        y = _rms(x, state[p + "pre_mlp_layernorm.weight"], arch.norm_eps)
        gate, up = (y @ state[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ state[p + "mlp.linear_fc2.weight"].T
    x = _rms(x, state["decoder.final_layernorm.weight"], arch.norm_eps)
    out = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return x @ out.T


def logprob_entropy(state, arch, tokens, response_mask, temperature=1.0):
    """Aligned [N, S] log-probs of each token and entropies, zero outside the mask."""
    logp_all = torch.log_softmax(logits(state, arch, tokens) / temperature, dim=-1)
    lp = logp_all[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    mask = response_mask[:, 1:].float()
    pad = torch.zeros(tokens.shape[0], 1)
    return torch.cat([pad, lp * mask], 1), torch.cat([pad, ent * mask], 1)


class Policy:
    """Reference trainer: one AdamW over all weights, kept across passes (as Megatron's is).

    Weight decay skips 1-D tensors and biases, like Megatron. Each pass takes the batch's
    mini-batches in order; each is a token-mean GRPO loss, clip-by-norm, one AdamW step.
    """

    def __init__(
        self,
        state,
        arch,
        *,
        mini_batch: int,
        lr: float,
        weight_decay: float,
        betas,
        eps: float,
        clip: float,
        clip_low: float,
        clip_high: float,
        entropy_coef: float,
        temperature: float = 1.0,
    ):
        self.arch, self.mini_batch, self.clip = arch, mini_batch, clip
        self.clip_low, self.clip_high = clip_low, clip_high
        self.entropy_coef, self.temperature = entropy_coef, temperature
        self.params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        decay = [p for k, p in self.params.items() if p.dim() > 1 and not k.endswith(".bias")]
        no_decay = [p for k, p in self.params.items() if p.dim() <= 1 or k.endswith(".bias")]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
            eps=eps,
        )
        self.steps = 0

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def train_pass(self, tokens, response_mask, advantages, old_logprobs) -> list[float]:
        """One pass; returns the gradient norm of each step."""
        norms = []
        for start in range(0, tokens.shape[0], self.mini_batch):
            rows = slice(start, start + self.mini_batch)
            lp, ent = logprob_entropy(
                self.params, self.arch, tokens[rows], response_mask[rows], self.temperature
            )
            mask = response_mask[rows].float()
            adv = advantages[rows, None]
            ratio = torch.exp(lp - old_logprobs[rows])
            pg = torch.maximum(
                -adv * ratio, -adv * ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
            )
            loss = ((pg - self.entropy_coef * ent) * mask).sum() / mask.sum()
            self.optimizer.zero_grad()
            loss.backward()
            params = list(self.params.values())
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.clip)))
            self.optimizer.step()
            self.steps += 1
        return norms

    def sfpo_iteration(self, batch: dict, inner_steps: int, alpha: float) -> None:
        """The spec's formula: K passes, theta = theta0 + alpha (thetaK - theta0), one pass."""
        theta0 = self.state()
        for _ in range(inner_steps):
            self.train_pass(**batch)
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(theta0[name] + alpha * (param - theta0[name]))
        self.train_pass(**batch)
