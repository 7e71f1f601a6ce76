"""SFPO inside Megatron's optimizers (bf16 model, fp32 master weights, DP2): what the
reposition writes, what it allocates, and that DP replicas stay identical.
Measurements: tests/dist/sfpo_internals_worker.py."""

from __future__ import annotations

import json

import pytest
import torch
from layouts import make_batch

from sfpo_megatron.models.arch import read_hf_config

import reference as ref
from conftest import TESTS, torchrun, write_hf_config

CASES = {
    "dist_opt_gpu_snapshot": [],
    "dist_opt_overlap_host_snapshot": [
        "algorithm.sfpo.snapshot=host",
        "parallel.overlap_param_gather=true",
    ],
    "no_dist_opt_host_snapshot": [
        "parallel.distributed_optimizer=false",
        "algorithm.sfpo.snapshot=host",
    ],
}


@pytest.fixture(scope="module", params=list(CASES))
def report(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    directory = write_hf_config(root / "m", "qwen2")
    arch = read_hf_config(directory)
    torch.save(ref.make_full_state(arch, seed=0), root / "state.pt")
    torch.save(make_batch(arch, seed=1), root / "batch.pt")
    overrides = [
        f"model.hf_config={directory}",
        "model.dtype=bf16",
        "algorithm.name=sfpo",
        "train.prompts_per_step=4",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=2",
        "optimizer.lr=1e-3",
        *CASES[request.param],
    ]
    torchrun(
        2,
        TESTS / "dist" / "sfpo_internals_worker.py",
        str(root / "report.json"),
        str(root / "state.pt"),
        str(root / "batch.pt"),
        *overrides,
    )
    return request.param, json.loads((root / "report.json").read_text())


def test_snapshot_is_one_copy_of_this_ranks_shard(report):
    case, r = report
    assert r["snapshot_elements"] == r["master_elements"]
    assert r["capture_bytes"] == 4 * r["master_elements"]  # allocated once, fp32
    assert r["second_capture_bytes"] == 0
    if case.startswith("dist_opt"):  # the distributed optimizer's shard: about half under DP2
        assert r["master_elements"] < 0.75 * r["local_param_elements"]
    else:
        assert r["master_elements"] == r["local_param_elements"]


def test_reposition_allocates_nothing(report):
    _, r = report
    assert r["reposition_bytes"] == 0


def test_reposition_writes_masters_and_bf16_params(report):
    _, r = report
    assert r["masters_on_formula"]
    assert r["models_are_rounded_masters"]
    assert r["replicas_identical"]
