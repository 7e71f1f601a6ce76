"""Every parallel layout the suite checks against tests/reference.py, and the runner that
launches them: one torchrun launch per world size, GRPO and SFPO layouts together (start-up
dominates the cost on CPU).

Why ``adam_eps = 1e-3``: at step 1 Adam's update is lr * g / (|g| + eps), i.e. lr * sign(g)
when |g| >> eps. With eps = 1e-8, gradients that are ~0 (rounding noise of a different
reduction order under TP/DP) become full +-lr steps of random sign, so two correct
implementations differ by 2 lr on those elements. A larger eps keeps the update a smooth
function of the gradient, so the comparison checks the math rather than noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sfpo_megatron.models.arch import read_hf_config

import reference as ref
from conftest import TESTS, torchrun, write_hf_config

LR, EPS, MINI_BATCH, K, ALPHA = 1e-3, 1e-3, 4, 3, 0.8
REF_HYPER = dict(
    mini_batch=MINI_BATCH,
    lr=LR,
    weight_decay=0.01,
    betas=(0.9, 0.999),
    eps=EPS,
    clip=1.0,
    clip_low=0.2,
    clip_high=0.2,
    entropy_coef=0.001,
)
BASE = [
    "train.prompts_per_step=4",
    "train.samples_per_prompt=2",
    "train.mini_batch_prompts=2",
    "train.micro_batch_size=1",
    f"optimizer.lr={LR}",
    f"optimizer.adam_eps={EPS}",
    "model.dtype=fp32",
    f"algorithm.sfpo.inner_steps={K}",
    f"algorithm.sfpo.alpha={ALPHA}",
    # Packs of two of make_batch's sequences (14-16 tokens): several packs per mini-batch.
    "data.max_prompt_length=8",
    "rollout.max_response_length=24",
    "train.max_tokens_per_micro_batch=32",
]
TP2, PP2, VPP2, SP = (
    "parallel.tensor=2",
    "parallel.pipeline=2",
    "parallel.virtual_pipeline=2",
    "parallel.sequence_parallel=true",
)
NO_DIST_OPT, BF16, HOST, PADDED = (
    "parallel.distributed_optimizer=false",
    "model.dtype=bf16",
    "algorithm.sfpo.snapshot=host",
    "train.packing=false",
)
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]

# name -> (world size, model, algorithm, overrides)
GRPO_FP32 = {
    "tp1": (1, "qwen2", []),
    "tp1_no_dist_opt": (1, "qwen2", [NO_DIST_OPT]),
    "tp1_qwen3": (1, "qwen3", []),
    "tp2": (2, "qwen2", [TP2]),
    "tp2_sp": (2, "qwen2", [TP2, SP]),
    "tp2_qwen3_sp": (2, "qwen3", [TP2, SP]),
    "tp2_llama": (2, "llama", [TP2, NO_DIST_OPT]),
    "pp2": (2, "qwen2", [PP2]),
    "pp2_qwen3_tied": (2, "qwen3", [PP2]),
    "pp2_vpp2": (2, "qwen2", [PP2, VPP2]),
    "dp2": (2, "qwen2", []),
    "dp2_no_dist_opt": (2, "qwen2", [NO_DIST_OPT]),
    "dp2_overlap": (2, "qwen2", OVERLAP),
    "tp2_pp2": (4, "qwen2", [TP2, PP2]),
    "tp2_pp2_qwen3_tied": (4, "qwen3", [TP2, PP2]),
    "tp2_dp2": (4, "qwen2", [TP2]),
    "tp2_dp2_sp_no_dist_opt": (4, "qwen2", [TP2, SP, NO_DIST_OPT]),
    "pp2_dp2": (4, "qwen2", [PP2]),
    "pp2_vpp2_dp2": (4, "qwen2", [PP2, VPP2]),
}
GRPO_BF16 = {
    "tp2_bf16": (2, "qwen2", [TP2, BF16]),
    "pp2_dp2_bf16": (4, "qwen3", [PP2, BF16]),
}
SFPO_FP32 = {
    "sfpo_tp1": (1, "qwen2", []),
    "sfpo_tp2": (2, "qwen2", [TP2]),
    "sfpo_tp2_host": (2, "qwen3", [TP2, HOST]),
    "sfpo_tp2_sp": (2, "qwen2", [TP2, SP]),
    "sfpo_pp2": (2, "qwen2", [PP2]),
    "sfpo_pp2_vpp2": (2, "qwen2", [PP2, VPP2]),
    "sfpo_pp2_host_no_dist_opt": (2, "qwen2", [PP2, HOST, NO_DIST_OPT]),
    "sfpo_dp2": (2, "qwen2", []),
    "sfpo_dp2_host": (2, "qwen2", [HOST]),
    "sfpo_dp2_no_dist_opt": (2, "qwen2", [NO_DIST_OPT]),
    "sfpo_dp2_overlap": (2, "qwen2", OVERLAP),
    "sfpo_tp2_dp2": (4, "qwen2", [TP2]),
    "sfpo_tp2_dp2_host_no_dist_opt": (4, "qwen2", [TP2, HOST, NO_DIST_OPT]),
    "sfpo_pp2_dp2_host": (4, "qwen2", [PP2, HOST]),
    "sfpo_tp2_pp2": (4, "qwen3", [TP2, PP2]),
}
SFPO_BF16 = {
    "sfpo_dp2_bf16": (2, "qwen2", [BF16]),
    "sfpo_tp2_dp2_bf16_host": (4, "qwen2", [TP2, BF16, HOST]),
}
PACKING_CHECKED = ("tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2")
"""Layouts also run with padded micro-batches, for a packed-vs-padded comparison."""
for _table, _prefix in ((GRPO_FP32, ""), (SFPO_FP32, "sfpo_")):
    for _name in PACKING_CHECKED:
        _world, _model, _overrides = _table[_prefix + _name]
        _table[f"{_prefix}{_name}_padded"] = (_world, _model, _overrides + [PADDED])
GROUPS = {"grpo": {**GRPO_FP32, **GRPO_BF16}, "sfpo": {**SFPO_FP32, **SFPO_BF16}}


def make_batch(arch, seed: int) -> dict:
    """8 right-padded sequences of 16 tokens with prompts and responses of varied length."""
    g = torch.Generator().manual_seed(seed)
    n, s = 8, 16
    tokens = torch.randint(0, arch.vocab_size, (n, s), generator=g)
    mask = torch.zeros(n, s, dtype=torch.bool)
    for i in range(n):
        mask[i, 3 + i % 4 : s - i % 3] = True
    return {"tokens": tokens, "response_mask": mask, "advantages": torch.randn(n, generator=g)}


def _reference(root: Path, family: str) -> dict:
    directory = write_hf_config(root / family, family)
    arch = read_hf_config(directory)
    state = ref.make_full_state(arch, seed=0)
    batch = make_batch(arch, seed=1)
    lp, ent = ref.logprob_entropy(state, arch, batch["tokens"], batch["response_mask"])
    noise = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    batch["old_logprobs"] = lp + 0.05 * noise * batch["response_mask"]
    grpo = ref.Policy(state, arch, **REF_HYPER)
    grpo.train_pass(**batch)
    sfpo = ref.Policy(state, arch, **REF_HYPER)
    sfpo.sfpo_iteration(batch, K, ALPHA)
    torch.save(state, root / f"{family}_state.pt")
    torch.save(batch, root / f"{family}_batch.pt")
    return {
        "dir": directory,
        "state": state,
        "logprobs": lp,
        "entropy": ent,
        "trained": {"grpo": grpo.state(), "sfpo": sfpo.state()},
    }


def run_all(root: Path) -> dict[str, tuple[dict, dict, str]]:
    """{layout: (reference of its model, Megatron results, algorithm)} for every layout."""
    models = {family: _reference(root, family) for family in ("qwen2", "qwen3", "llama")}
    layouts = {
        name: (world, model, algorithm, overrides)
        for algorithm, table in GROUPS.items()
        for name, (world, model, overrides) in table.items()
    }
    for world in (1, 2, 4):
        spec = {
            "out": str(root),
            "layouts": {
                name: {
                    "overrides": BASE
                    + [f"model.hf_config={models[model]['dir']}", f"algorithm.name={algorithm}"]
                    + overrides,
                    "state": str(root / f"{model}_state.pt"),
                    "batch": str(root / f"{model}_batch.pt"),
                }
                for name, (w, model, algorithm, overrides) in layouts.items()
                if w == world
            },
        }
        (root / f"spec{world}.json").write_text(json.dumps(spec))
        torchrun(world, TESTS / "dist" / "layouts_worker.py", str(root / f"spec{world}.json"))
    return {
        name: (models[model], torch.load(root / f"{name}.pt"), algorithm)
        for name, (_, model, algorithm, _) in layouts.items()
    }


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def assert_matches_reference(model: dict, got: dict, algorithm: str) -> None:
    """fp32: log-probs, entropy, every parameter and every parameter's update to the reference."""
    assert rel_err(got["logprobs"], model["logprobs"]) < 1e-5
    assert rel_err(got["entropy"], model["entropy"]) < 1e-5
    trained = model["trained"][algorithm]
    assert set(got["state"]) == set(trained)
    for name, expected in trained.items():
        before = model["state"][name]
        assert rel_err(got["state"][name], expected) < 1e-5, name
        # The update itself, not only the parameters it moved, must agree.
        assert rel_err(got["state"][name] - before, expected - before) < 1e-3, name


def assert_within_bf16(model: dict, got: dict, algorithm: str, adam_steps: int) -> None:
    """bf16 keeps 8 mantissa bits: each stored value is off by up to 2^-8 relative, and the
    forward pass compounds such roundings through 4 layers. Log-probs (magnitude 7-11) are
    required within 0.1 absolute, entropy within 2%. A parameter may differ from the fp32
    reference by one bf16 rounding of itself plus two Adam steps per step taken (2 lr: a
    near-zero gradient may change sign between precisions); a wrong layout is off by
    O(|param|)."""
    mask = got["logprobs"] != 0
    assert (got["logprobs"] - model["logprobs"]).abs().max() < 0.1
    assert rel_err(got["entropy"][mask], model["entropy"][mask]) < 0.02
    for name, expected in model["trained"][algorithm].items():
        bound = expected.abs() * 2**-8 + 2 * LR * adam_steps + 1e-6
        assert ((got["state"][name].float() - expected).abs() <= bound).all(), name
