"""The Megatron actor against a single-process plain-PyTorch reference (tests/reference.py)
under every parallel layout: log-probs, entropy, and all parameters after a training pass.

Layouts are grouped into one torchrun launch per world size (start-up dominates on CPU).

Why ``adam_eps = 1e-3``: at step 1 Adam's update is lr * g / (|g| + eps), i.e. lr * sign(g)
when |g| >> eps. With eps = 1e-8, gradients that are ~0 (rounding noise of a different
reduction order under TP/DP) become full +-lr steps of random sign, so two correct
implementations differ by 2 lr on those elements. A larger eps keeps the update a smooth
function of the gradient, so the comparison checks the math rather than noise.
"""

from __future__ import annotations

import json

import pytest
import torch

from sfpo_megatron.models.arch import read_hf_config

import reference as ref
from conftest import TESTS, torchrun, write_hf_config

LR, EPS, MINI_BATCH = 1e-3, 1e-3, 4

# name -> (world size, model, overrides)
LAYOUTS = {
    "tp1": (1, "qwen2", []),
    "tp1_no_dist_opt": (1, "qwen2", ["parallel.distributed_optimizer=false"]),
    "tp1_qwen3": (1, "qwen3", []),
    "tp2": (2, "qwen2", ["parallel.tensor=2"]),
    "tp2_sp": (2, "qwen2", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "tp2_qwen3_sp": (2, "qwen3", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "tp2_llama": (2, "llama", ["parallel.tensor=2", "parallel.distributed_optimizer=false"]),
    "pp2": (2, "qwen2", ["parallel.pipeline=2"]),
    "pp2_qwen3_tied": (2, "qwen3", ["parallel.pipeline=2"]),
    "pp2_vpp2": (2, "qwen2", ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "dp2": (2, "qwen2", []),
    "dp2_no_dist_opt": (2, "qwen2", ["parallel.distributed_optimizer=false"]),
    "dp2_overlap": (
        2,
        "qwen2",
        ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
    ),
    "tp2_pp2": (4, "qwen2", ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2_pp2_qwen3_tied": (4, "qwen3", ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2_dp2": (4, "qwen2", ["parallel.tensor=2"]),
    "tp2_dp2_sp_no_dist_opt": (
        4,
        "qwen2",
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.distributed_optimizer=false",
        ],
    ),
    "pp2_dp2": (4, "qwen2", ["parallel.pipeline=2"]),
    "pp2_vpp2_dp2": (4, "qwen2", ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
}
BF16_LAYOUTS = {
    "tp2_bf16": (2, "qwen2", ["parallel.tensor=2", "model.dtype=bf16"]),
    "pp2_dp2_bf16": (4, "qwen3", ["parallel.pipeline=2", "model.dtype=bf16"]),
}


def make_batch(arch, seed: int) -> dict:
    """8 right-padded sequences of 16 tokens with prompts and responses of varied length."""
    g = torch.Generator().manual_seed(seed)
    n, s = 8, 16
    tokens = torch.randint(0, arch.vocab_size, (n, s), generator=g)
    mask = torch.zeros(n, s, dtype=torch.bool)
    for i in range(n):
        mask[i, 3 + i % 4 : s - i % 3] = True
    return {"tokens": tokens, "response_mask": mask, "advantages": torch.randn(n, generator=g)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference results and the Megatron results of every layout, by layout name."""
    root = tmp_path_factory.mktemp("layouts")
    models = {}
    for family in ("qwen2", "qwen3", "llama"):
        directory = write_hf_config(root / family, family)
        arch = read_hf_config(directory)
        state = ref.make_full_state(arch, seed=0)
        batch = make_batch(arch, seed=1)
        lp, ent = ref.logprob_entropy(state, arch, batch["tokens"], batch["response_mask"])
        noise = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
        batch["old_logprobs"] = lp + 0.05 * noise * batch["response_mask"]
        trained, _ = ref.train_pass(
            state,
            arch,
            **batch,
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
        torch.save(state, root / f"{family}_state.pt")
        torch.save(batch, root / f"{family}_batch.pt")
        models[family] = {
            "dir": directory,
            "state": state,
            "logprobs": lp,
            "entropy": ent,
            "trained": trained,
        }
    base = [
        "train.prompts_per_step=4",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=2",
        "train.micro_batch_size=1",
        f"optimizer.lr={LR}",
        f"optimizer.adam_eps={EPS}",
        "model.dtype=fp32",
    ]
    all_layouts = {**LAYOUTS, **BF16_LAYOUTS}
    for world in (1, 2, 4):
        spec = {
            "out": str(root),
            "layouts": {
                name: {
                    "overrides": base + [f"model.hf_config={models[model]['dir']}"] + overrides,
                    "state": str(root / f"{model}_state.pt"),
                    "batch": str(root / f"{model}_batch.pt"),
                }
                for name, (w, model, overrides) in all_layouts.items()
                if w == world
            },
        }
        (root / f"spec{world}.json").write_text(json.dumps(spec))
        torchrun(world, TESTS / "dist" / "layouts_worker.py", str(root / f"spec{world}.json"))
    return {
        name: (models[model], torch.load(root / f"{name}.pt"))
        for name, (_, model, _) in all_layouts.items()
    }


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference_fp32(runs, layout):
    model, got = runs[layout]
    assert rel_err(got["logprobs"], model["logprobs"]) < 1e-5
    assert rel_err(got["entropy"], model["entropy"]) < 1e-5
    assert set(got["state"]) == set(model["trained"])
    for name, expected in model["trained"].items():
        before = model["state"][name]
        assert rel_err(got["state"][name], expected) < 1e-5, name
        # The update itself, not only the parameters it moved, must agree.
        assert rel_err(got["state"][name] - before, expected - before) < 1e-3, name
    assert got["metrics"]["optimizer_steps"] == 2


@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
def test_layout_bf16_within_rounding(runs, layout):
    """bf16 keeps 8 mantissa bits: each stored value is off by up to 2^-8 relative, and the
    forward pass compounds such roundings through 4 layers. Log-probs (magnitude 7-11) are
    required within 0.1 absolute, entropy within 2%. A parameter may differ from the fp32
    reference by one bf16 rounding of itself plus two Adam steps (2 lr: a near-zero
    gradient may change sign between precisions); a wrong layout is off by O(|param|)."""
    model, got = runs[layout]
    mask = got["logprobs"] != 0
    assert (got["logprobs"] - model["logprobs"]).abs().max() < 0.1
    assert rel_err(got["entropy"][mask], model["entropy"][mask]) < 0.02
    for name, expected in model["trained"].items():
        bound = expected.abs() * 2**-8 + 2 * LR + 1e-6
        assert ((got["state"][name].float() - expected).abs() <= bound).all(), name
