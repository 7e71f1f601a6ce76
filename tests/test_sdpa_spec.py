"""The torch-SDPA layer spec (``model.attention=sdpa``): SDPAttention against explicit softmax
attention, FusedRMSNorm against the reference RMSNorm, which spec ``model.attention`` picks,
and whole actors built with ``sdpa`` and with ``local`` (Megatron's DotProductAttention) from
the same weights: log-probs, entropy, losses and every parameter after two training passes,
under TP2, sequence parallelism and DP2, with grouped KV heads (2:1 and Llama's 4:1).

Run under torchrun (``python -m torch.distributed.run ... test_sdpa_spec.py SPEC.json``) this
file is the worker of the actor comparison: one launch runs every case with both specs.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from layouts import BASE, SP, TP2, assert_within_bf16, make_batch, rel_err
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import load_config
from sfpo_megatron.models import spec
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.models.sdpa import SDPAttention
from sfpo_megatron.models.spec import FusedRMSNorm, RMSNorm

import reference as ref
from conftest import torchrun, write_hf_config

# ---------------------------------------------------------------- attention, norm, choice


def _config(heads: int, groups: int, head_dim: int = 8, **overrides) -> TransformerConfig:
    args = dict(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,  # Megatron's default is 0.1
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**args, **overrides})


def _attention(config: TransformerConfig, **kwargs) -> SDPAttention:
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(config, **{**args, **kwargs})


def _qkv(seq: int, batch: int, heads: int, groups: int, dtype: torch.dtype, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    shapes = [(seq, batch, heads, head_dim)] + [(seq, batch, groups, head_dim)] * 2
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _explicit_attention(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention written out in float64: repeated KV heads, S x S scores, softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    seq, batch, heads, head_dim = q.shape
    k, v = (t.repeat_interleave(heads // t.size(2), dim=2) for t in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(seq, batch, heads * head_dim)


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_explicit_causal_attention(heads, groups, dtype, tol):
    """Output and input gradients against float64 math on the same (rounded) inputs; bf16
    within a few bf16 roundings (the kernel rounds its inputs' products once, at the end)."""
    attention = _attention(_config(heads, groups))
    q, k, v = _qkv(12, 3, heads, groups, dtype)
    out = attention(q, k, v, None)
    expected = _explicit_attention(q, k, v, 1 / math.sqrt(8))
    assert out.shape == (12, 3, heads * 8) and out.dtype == dtype
    assert rel_err(out, expected) < tol
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < tol, name


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2)])
def test_packed_sequences_attend_within_themselves(heads, groups):
    """THD input (``[t, heads, d]``, Megatron's packed format): each sequence's output and
    input gradients are those of causal attention over that sequence alone."""
    attention = _attention(_config(heads, groups))
    lengths = [5, 1, 7, 3]
    q, k, v = (
        t[:, 0].detach().requires_grad_()
        for t in _qkv(sum(lengths), 1, heads, groups, torch.float32)
    )
    bounds = torch.tensor([0, *lengths]).cumsum(0).int()
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=bounds,
        cu_seqlens_kv=bounds,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    out = attention(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(lengths), heads * 8)
    expected = torch.cat(
        [
            _explicit_attention(*(t[a:b].unsqueeze(1) for t in (q, k, v)), 1 / math.sqrt(8))[:, 0]
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]
    )
    assert rel_err(out, expected) < 2e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 2e-6, name


def test_sdpa_uses_the_configured_softmax_scale():
    q, k, v = _qkv(6, 2, 4, 2, torch.float32)
    out = _attention(_config(4, 2), softmax_scale=0.5)(q, k, v, None)
    assert rel_err(out, _explicit_attention(q, k, v, 0.5)) < 2e-6


@pytest.mark.parametrize(
    "kwargs, config, what",
    [
        ({"attn_mask_type": AttnMaskType.padding}, {}, "attn_mask_type=padding"),
        ({"attn_mask_type": AttnMaskType.no_mask}, {}, "attn_mask_type=no_mask"),
        ({"attention_type": "cross"}, {}, "attention_type='cross'"),
        ({}, {"window_size": (4, 0)}, "sliding-window"),
    ],
)
def test_sdpa_refuses_unsupported_layers(kwargs, config, what):
    with pytest.raises(NotImplementedError, match=what):
        _attention(_config(4, 2, **config), **kwargs)


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"packed_seq_params": PackedSeqParams(qkv_format="sbhd")}, "packed formats"),
        ({"attention_bias": torch.zeros(1)}, "attention bias"),
        ({"attn_mask_type": AttnMaskType.no_mask}, "attn_mask_type"),
    ],
)
def test_sdpa_refuses_unsupported_inputs(kwargs, what):
    q, k, v = _qkv(6, 2, 4, 2, torch.float32)
    with pytest.raises(NotImplementedError, match=what):
        _attention(_config(4, 2))(q, k, v, None, **kwargs)


def test_sdpa_refuses_masks_and_kv_caches():
    attention = _attention(_config(4, 2))
    q, k, v = _qkv(6, 2, 4, 2, torch.float32)
    with pytest.raises(NotImplementedError, match="explicit attention mask"):
        attention(q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="different lengths"):
        attention(q[:1], k, v, None)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_sdpa_dropout_in_training_only(monkeypatch, sequence_parallel):
    """Attention dropout as DotProductAttention applies it: training only, unbiased, from the
    model-parallel RNG tracker unless sequence parallelism is on."""
    forks = []

    @contextlib.contextmanager
    def fork():
        forks.append(1)
        yield

    tracker = SimpleNamespace(fork=fork)
    monkeypatch.setattr(
        "sfpo_megatron.models.sdpa.tensor_parallel",
        SimpleNamespace(get_cuda_rng_tracker=lambda: tracker),
    )
    config = _config(4, 2, attention_dropout=0.5)
    config.sequence_parallel = sequence_parallel  # only read at forward time here
    attention = _attention(config)
    q, k, v = (t.detach() for t in _qkv(8, 2, 4, 2, torch.float32))
    exact = _explicit_attention(q, k, v, 1 / math.sqrt(8)).float()
    attention.eval()
    assert rel_err(attention(q, k, v, None), exact) < 2e-6
    assert not forks
    attention.train()
    torch.manual_seed(0)
    draws = torch.stack([attention(q, k, v, None) for _ in range(400)])
    assert rel_err(draws[0], exact) > 0.1  # dropped
    assert rel_err(draws.mean(0), exact) < 0.15  # but unbiased
    assert len(forks) == (0 if sequence_parallel else 400)


def _norm_config(dtype: torch.dtype) -> SimpleNamespace:
    return SimpleNamespace(params_dtype=dtype, use_cpu_initialization=True, sequence_parallel=True)


def test_fused_rmsnorm_matches_reference_norm():
    """Output and gradients equal to the reference norm's, in fp32 and in bf16 (both round
    the normalised value before the weight)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        fused, plain = FusedRMSNorm(_norm_config(dtype), 64), RMSNorm(_norm_config(dtype), 64)
        weight = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
        for norm in (fused, plain):
            norm.weight.data.copy_(weight)
        x = (3 * torch.randn(5, 2, 64, generator=g)).to(dtype).requires_grad_()
        got, want = fused(x), plain(x)
        assert fused.weight.sequence_parallel
        assert got.dtype == dtype and torch.equal(got, want)
        grad = torch.randn(got.shape, generator=g).to(dtype)
        for a, b in zip(
            torch.autograd.grad(got, (x, fused.weight), grad),
            torch.autograd.grad(want, (x, plain.weight), grad),
            strict=True,
        ):
            assert rel_err(a, b) < (1e-6 if dtype == torch.float32 else 2e-2)


def _layer_modules(block) -> tuple[type, type, type]:
    layer = block.layer_specs[0].submodules
    attention = layer.self_attention.submodules
    return attention.core_attention, layer.input_layernorm, block.layer_norm


@pytest.fixture
def gpu_with_te(monkeypatch):
    """Pretend CUDA and Transformer Engine are both usable; the TE spec becomes a marker."""
    import megatron.core.transformer.transformer_block as block

    monkeypatch.setattr(block, "get_num_layers_to_build", lambda config, vp_stage=None: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(spec, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(spec, "te_layer_spec", lambda arch: "te")


@pytest.fixture
def cpu_only(monkeypatch):
    import megatron.core.transformer.transformer_block as block

    monkeypatch.setattr(block, "get_num_layers_to_build", lambda config, vp_stage=None: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def qwen3(tmp_path):
    return read_hf_config(write_hf_config(tmp_path / "qwen3", "qwen3"))


def test_auto_is_sdpa_without_te_and_te_with_it(qwen3, cpu_only, monkeypatch):
    chosen = spec.block_spec(qwen3, None, None)
    assert _layer_modules(chosen) == (SDPAttention, FusedRMSNorm, FusedRMSNorm)
    assert chosen.layer_specs[0].submodules.self_attention.submodules.q_layernorm is FusedRMSNorm
    assert len(chosen.layer_specs) == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(spec, "have_transformer_engine", lambda: False)  # a GPU without TE
    assert _layer_modules(spec.block_spec(qwen3, None, None))[0] is SDPAttention


def test_explicit_choices_override_te(qwen3, gpu_with_te):
    assert spec.block_spec(qwen3, None, None) == "te"
    assert spec.block_spec(qwen3, None, None, "auto") == "te"
    sdpa = spec.block_spec(qwen3, None, None, "sdpa")
    assert _layer_modules(sdpa) == (SDPAttention, FusedRMSNorm, FusedRMSNorm)
    local = spec.block_spec(qwen3, None, None, "local")
    assert _layer_modules(local) == (DotProductAttention, RMSNorm, RMSNorm)
    with pytest.raises(ValueError, match="'flash'"):
        spec.block_spec(qwen3, None, None, "flash")


def test_config_attention_key():
    hf = "model.hf_config=x"
    assert load_config(None, [hf]).model.attention == "auto"
    local = load_config(None, [hf, "model.attention=local", "train.packing=false"])
    assert local.model.attention == "local"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, [hf, "model.attention=flash"])


# ---------------------------------------------------------------- whole actors, sdpa vs local

BF16 = "model.dtype=bf16"
CASES = {
    "tp2_qwen2": ("qwen2", [TP2]),  # 4 heads : 2 groups -> 2 : 1 on each rank
    "tp2_sp_qwen3": ("qwen3", [TP2, SP]),  # QK-norm (fused), sequence parallel
    "tp2_llama": ("llama", [TP2]),  # 8 : 2 -> 4 : 1 on each rank
    "dp2_llama": ("llama", []),  # 8 : 2 = 4 : 1, TP1
    "tp2_sp_qwen2_bf16": ("qwen2", [TP2, SP, BF16]),
    "dp2_qwen3_bf16": ("qwen3", [BF16]),
}
FP32_OF = {"tp2_sp_qwen2_bf16": "tp2_qwen2", "dp2_qwen3_bf16": "tp2_sp_qwen3"}
"""The fp32 case with the same model (and so the same weights and batch) of each bf16 case."""
PASSES = 2  # training passes; 2 optimizer steps each
MODULES = {
    "sdpa": ["FusedRMSNorm", "SDPAttention"],
    "local": ["DotProductAttention", "RMSNorm"],
}


@pytest.fixture(scope="module")
def actor_runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """{case: {"sdpa": results, "local": results}} from one 2-rank launch."""
    root = tmp_path_factory.mktemp("sdpa_spec")
    families = {family for family, _ in CASES.values()}
    for family in families:
        directory = write_hf_config(root / family, family)
        arch = read_hf_config(directory)
        state = ref.make_full_state(arch, seed=0)
        batch = make_batch(arch, seed=1)
        logprobs, _ = ref.logprob_entropy(state, arch, batch["tokens"], batch["response_mask"])
        noise = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2))
        batch["old_logprobs"] = logprobs + 0.05 * noise * batch["response_mask"]
        torch.save(state, root / f"{family}_state.pt")
        torch.save(batch, root / f"{family}_batch.pt")
    cases = {
        name: {
            "overrides": BASE
            + [f"model.hf_config={root / family}", "algorithm.name=grpo"]
            + overrides,
            "state": str(root / f"{family}_state.pt"),
            "batch": str(root / f"{family}_batch.pt"),
        }
        for name, (family, overrides) in CASES.items()
    }
    (root / "spec.json").write_text(json.dumps({"out": str(root), "cases": cases}))
    torchrun(2, Path(__file__), str(root / "spec.json"))
    return {
        name: {attention: torch.load(root / f"{name}_{attention}.pt") for attention in MODULES}
        for name in CASES
    }


@pytest.mark.parametrize("case", list(CASES))
def test_actor_builds_the_chosen_modules(actor_runs, case):
    for attention, modules in MODULES.items():
        assert actor_runs[case][attention]["modules"] == modules


@pytest.mark.parametrize("case", [c for c in CASES if c not in FP32_OF])
def test_sdpa_actor_matches_local_fp32(actor_runs, case):
    """fp32: equal up to summation order (measured: about 1e-6 relative for log-probs and
    entropy, 2e-7 for parameters, 6e-5 for their updates after four Adam steps)."""
    sdpa, local = actor_runs[case]["sdpa"], actor_runs[case]["local"]
    assert rel_err(sdpa["logprobs"], local["logprobs"]) < 5e-6
    assert rel_err(sdpa["entropy"], local["entropy"]) < 5e-6
    for got, want in zip(sdpa["passes"], local["passes"], strict=True):
        for key in ("pg_loss", "entropy", "approx_kl", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    before = local["before"]
    assert set(sdpa["state"]) == set(local["state"]) == set(before)
    for name, want in local["state"].items():
        assert rel_err(sdpa["state"][name], want) < 1e-6, name
        assert rel_err(sdpa["state"][name] - before[name], want - before[name]) < 1e-3, name


@pytest.mark.parametrize("attention", list(MODULES))
@pytest.mark.parametrize("case", list(FP32_OF))
def test_bf16_actor_within_rounding_of_fp32(actor_runs, case, attention):
    """bf16, either spec, against the fp32 run of the same model, weights and batch, with the
    layout tests' bf16 tolerances: SDPA (fp32 scores and probabilities inside the kernel)
    and Megatron's attention (bf16 scores) round differently, so they are held to the same
    distance from the exact values rather than to each other."""
    truth = actor_runs[FP32_OF[case]]["local"]
    model = {
        "logprobs": truth["logprobs"],
        "entropy": truth["entropy"],
        "trained": {"grpo": truth["state"]},
    }
    assert_within_bf16(model, actor_runs[case][attention], "grpo", adam_steps=2 * PASSES)


# ---------------------------------------------------------------- torchrun worker


def _run_actor(overrides: list[str], attention: str, state: dict, batch_data: dict) -> dict:
    from full_state import gather_full_state, load_full_state

    from sfpo_megatron.launch.parallel import init_distributed
    from sfpo_megatron.models import gpt
    from sfpo_megatron.policy.actor import Actor
    from sfpo_megatron.policy.batch import PolicyBatch
    from sfpo_megatron.policy.optim import build_optimizer

    packing = "train.packing=false" if attention == "local" else "train.packing=true"
    cfg = load_config(None, [*overrides, f"model.attention={attention}", packing])
    arch = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg, arch)
    chunks = gpt.build_model(cfg, arch)
    load_full_state(chunks, state)
    actor = Actor(cfg, arch, chunks, *build_optimizer(cfg, chunks))
    batch = PolicyBatch(**batch_data)
    logprobs, entropy = actor.forward_logprobs(PolicyBatch(batch.tokens, batch.response_mask))
    passes = [actor.train_pass(batch) for _ in range(PASSES)]
    kinds = (SDPAttention, DotProductAttention, RMSNorm)
    modules = {type(m).__name__ for m in gpt.unwrap(chunks[0]).modules() if isinstance(m, kinds)}
    return {
        "modules": sorted(modules),
        "logprobs": logprobs,
        "entropy": entropy,
        "passes": passes,
        "before": state,
        "state": gather_full_state(chunks, arch.vocab_size),
    }


def main() -> None:
    import torch.distributed as dist

    from sfpo_megatron.launch.parallel import shutdown

    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    for name, case in job["cases"].items():
        state, batch = torch.load(case["state"]), torch.load(case["batch"])
        for attention in MODULES:
            result = _run_actor(case["overrides"], attention, state, batch)
            if dist.get_rank() == 0:
                torch.save(result, out / f"{name}_{attention}.pt")
            dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
