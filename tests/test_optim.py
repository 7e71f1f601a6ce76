"""The optimizer around the RL schedule: which params decay (optimizer.decay_norms_and_biases)
and the warm start's own learning rate, which leaves the RL schedule untouched."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TESTS, torchrun, write_hf_config

LR, WEIGHT_DECAY, WARM_START_LR = 0.1, 0.5, 5e-3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    model = write_hf_config(root / "qwen2", "qwen2")  # q/k/v biases, RMSNorm weights
    common = [f"model.hf_config={model}", "model.load_weights=false", "model.dtype=fp32"]
    spec = {
        "decay": common
        + [
            "parallel.distributed_optimizer=false",
            f"optimizer.lr={LR}",
            f"optimizer.weight_decay={WEIGHT_DECAY}",
        ],
        "warm_start": common
        + [
            "train.prompts_per_step=2",
            "train.samples_per_prompt=2",
            "train.mini_batch_prompts=2",
            "train.micro_batch_size=2",
            "optimizer.lr=1e-3",
            "optimizer.warmup_steps=4",
            "optimizer.lr_schedule=cosine",
            "train.warm_start_steps=3",
            f"train.warm_start_lr={WARM_START_LR}",
            "algorithm.kl_coef=0.1",
        ],
    }
    out = root / "result.pt"
    torchrun(1, TESTS / "dist" / "optim_worker.py", str(out), json.dumps(spec))
    return torch.load(out, weights_only=False)


def exempt_by_megatron(name: str, info: dict) -> bool:
    return info["dim"] == 1 or name.endswith(".bias")


def test_default_skips_norms_and_biases(results):
    params = results["decay"]["false"]
    exempt = [name for name, info in params.items() if exempt_by_megatron(name, info)]
    assert any("layernorm" in name for name in exempt) and any(".bias" in n for n in exempt)
    decay = 1 - LR * WEIGHT_DECAY  # AdamW's decoupled decay; zero gradients move nothing else
    for name, info in params.items():
        if exempt_by_megatron(name, info):
            assert info["weight_decay"] == 0.0, name
            assert torch.equal(info["after"], info["before"]), name
        else:
            assert info["weight_decay"] == WEIGHT_DECAY, name
            torch.testing.assert_close(info["after"], info["before"] * decay, msg=name)


def test_decay_norms_and_biases_decays_every_param(results):
    decay = 1 - LR * WEIGHT_DECAY
    for name, info in results["decay"]["true"].items():
        assert info["weight_decay"] == WEIGHT_DECAY, name
        torch.testing.assert_close(info["after"], info["before"] * decay, msg=name)


def test_warm_start_runs_at_its_own_lr_under_an_rl_warm_up(results):
    r = results["warm_start"]
    # the RL schedule's warm-up starts at LR 0: the warm start must not use it
    assert r["lr_before"] and set(r["lr_before"]) == {0.0}
    assert r["stepped_lrs"] == [[WARM_START_LR] * len(r["lr_before"])] * 3
    assert r["nll_after"] < r["nll_before"] - 1.0  # it trained (with algorithm.kl_coef > 0)


def test_warm_start_leaves_the_rl_schedule_as_it_found_it(results):
    r = results["warm_start"]
    assert r["schedule_after"] == r["schedule_before"]
    assert r["lr_after"] == r["lr_before"]
    # the first RL step is the schedule's first warm-up step: 1/4 of optimizer.lr
    assert r["lr_after_first_rl_step"] == pytest.approx([1e-3 / 4] * len(r["lr_before"]))
