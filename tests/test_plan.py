"""``sfpo-megatron plan``: the exact components (weights, gradients, master weights, Adam
states, SFPO snapshot) must equal the bytes CPU runs hold, rank by rank, across layouts
(counted by tests/dist/plan_worker.py). Activations and logits cannot be measured on CPU
(no allocator peak, and the local spec differs from the GPU one): only their structure is
checked (TP with SP, recompute, pipeline in-flight counts, attention kind).
"""

from __future__ import annotations

import argparse
import json

import pytest

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import load_config
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.tools import plan, plan_cli

from conftest import REPO, TESTS, torchrun, write_hf_config

EXACT = ("weights", "gradients", "master weights", "adam states", "sfpo snapshot")
BASE = [
    "train.prompts_per_step=4",
    "train.samples_per_prompt=2",
    "train.mini_batch_prompts=4",
    "algorithm.name=sfpo",
]
# Sizes that are not multiples of 64 (hidden 72, FFN 100, QK-norm 8, vocab 300), so the
# distributed optimizer's per-param and per-bucket padding shows in the counts.
MODELS = {
    "untied": ("qwen2", dict(hidden_size=72, intermediate_size=100)),
    "tied": ("qwen3", dict(intermediate_size=100)),
}
TP2, PP2, VPP2, SP = (
    "parallel.tensor=2",
    "parallel.pipeline=2",
    "parallel.virtual_pipeline=2",
    "parallel.sequence_parallel=true",
)
BF16, FP32 = "model.dtype=bf16", "model.dtype=fp32"
NO_DIST_OPT = "parallel.distributed_optimizer=false"
# name -> (world size, model, overrides)
LAYOUTS = {
    "tp2_bf16_untied": (2, "untied", [TP2, BF16]),
    "tp2_sp_fp32_tied_no_dist_opt": (2, "tied", [TP2, SP, FP32, NO_DIST_OPT]),
    "pp2_bf16_tied": (2, "tied", [PP2, BF16]),
    "pp2_vpp2_fp32_untied": (2, "untied", [PP2, VPP2, FP32]),
    "dp2_bf16_tied": (2, "tied", [BF16]),
    "dp2_bf16_untied_no_dist_opt": (2, "untied", [BF16, NO_DIST_OPT]),
    "dp2_fp32_untied_overlap": (2, "untied", [FP32, "parallel.overlap_grad_reduce=true"]),
    "tp2_pp2_bf16_tied": (4, "tied", [TP2, PP2, BF16]),
    "pp2_dp2_bf16_tied": (4, "tied", [PP2, BF16]),
    "dp4_fp32_untied": (4, "untied", [FP32]),
}


def overrides_of(root, name: str) -> list[str]:
    _, model, extra = LAYOUTS[name]
    return [*BASE, f"model.hf_config={root / model}", *extra]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    for model, (family, overrides) in MODELS.items():
        write_hf_config(root / model, family, **overrides)
    report = {}
    for world in (2, 4):
        spec = {
            "out": str(root / f"report{world}.json"),
            "layouts": {n: overrides_of(root, n) for n, (w, _, _) in LAYOUTS.items() if w == world},
        }
        (root / f"spec{world}.json").write_text(json.dumps(spec))
        torchrun(world, TESTS / "dist" / "plan_worker.py", str(root / f"spec{world}.json"))
        report.update(json.loads((root / f"report{world}.json").read_text()))
    return root, report


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exact_components_equal_what_a_run_holds(measured, name):
    root, report = measured
    cfg = load_config(None, overrides_of(root, name))
    world = LAYOUTS[name][0]
    planned = plan.plan_memory(cfg, read_hf_config(cfg.model.hf_config), world, seq_length=16)
    by_rank = {(r.stage, r.data_rank): r.bytes for r in planned.ranks}
    assert len(report[name]) == world
    for record in report[name]:
        assert record["states_per_main"]  # Adam holds state for every master weight
        assert record["sfpo snapshot"] == 4 * record["stepped_elements"]
        expected = by_rank[record["stage"], record["data_rank"]]
        assert {c: record[c] for c in EXACT} == {c: expected[c] for c in EXACT}, record


def test_distributed_optimizer_padding_is_counted(measured):
    """The odd sizes make the distributed optimizer's buffers larger than the params and its
    DP shards unequal, so the equality above checks the padding model, not plain sums."""
    _, report = measured
    for name, (_, _, overrides) in LAYOUTS.items():
        padded = NO_DIST_OPT not in overrides
        for record in report[name]:
            grads = 4 * record["param_elements"]
            assert record["gradients"] > grads if padded else record["gradients"] == grads
    first, second = report["dp2_bf16_tied"]
    assert first["adam states"] != second["adam states"]


# ---------------------------------------------------------------- structure of the estimates

QWEN7B = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen7b")
    (directory / "config.json").write_text(json.dumps(QWEN7B))
    return directory


def plan_of(directory, *overrides, world=8, **options):
    cfg = load_config(None, [f"model.hf_config={directory}", *overrides])
    options = {"seq_length": 4096, **options}
    return plan.plan_memory(cfg, read_hf_config(directory), world, **options)


def test_activation_estimate_structure(qwen7b):
    acts = lambda *o, **kw: plan_of(qwen7b, *o, **kw).worst("activations")  # noqa: E731
    tp1, tp2 = acts(), acts(TP2)
    assert 0.5 * tp1 < tp2 < tp1  # without SP norm/linear inputs stay whole on each TP rank
    assert acts(TP2, SP) == pytest.approx(tp1 / 2, rel=1e-3)  # everything splits over TP
    assert acts("model.recompute_activations=true") < tp1 / 5
    local = acts(world=8, flash_attention=False)
    assert local > tp1 + 28 * 28 * 4096**2 * 6 * 0.99  # fp32 softmax + bf16 cast of S x S
    padded = "train.packing=false"
    seq = lambda s: plan_of(qwen7b, padded, seq_length=s).worst("activations")  # noqa: E731
    assert seq(8192) == pytest.approx(2 * seq(4096), rel=1e-3)  # linear in S with flash
    assert seq(4096) == pytest.approx(tp1, rel=1e-3)  # the default budget: one padded row
    budget = lambda b: acts(f"train.max_tokens_per_micro_batch={b}")  # noqa: E731
    assert budget(2 * 4096) == pytest.approx(2 * budget(4096), rel=1e-3)  # packed: the budget
    stages = plan_of(qwen7b, "parallel.pipeline=4")
    per_stage = [stages.stage(s).bytes["activations"] for s in range(4)]
    assert per_stage[0] > per_stage[1] > per_stage[2]  # 1F1B: stage r holds P - r micro-batches
    assert per_stage[0] == pytest.approx(tp1, rel=0.01)  # P x L/P layers = one whole model
    vpp = plan_of(qwen7b, "parallel.pipeline=4", "parallel.virtual_pipeline=7")
    ratio = vpp.stage(0).bytes["activations"] / per_stage[0]
    assert ratio == pytest.approx(1 + 3 / 28, rel=0.01)  # interleaving: 1 + (P - 1) / (P V)


def test_logits_rollout_and_host_snapshot(qwen7b):
    pp2 = plan_of(qwen7b, "parallel.pipeline=2")
    assert pp2.stage(0).bytes["logits"] == 0
    assert pp2.stage(1).bytes["logits"] == 4096 * 152064 * (2 + 16)
    tp2 = plan_of(qwen7b, TP2)
    assert tp2.worst("logits") == 4096 * 152064 // 2 * (2 + 16)
    assert plan_of(qwen7b, "algorithm.sfpo.snapshot=host").worst("sfpo snapshot") == 0
    gpu = plan_of(qwen7b)
    assert gpu.worst("sfpo snapshot") == gpu.worst("master weights")  # both 4 B per element
    assert plan_of(qwen7b, "algorithm.name=grpo").worst("sfpo snapshot") == 0
    colocated = plan_of(qwen7b, rollout_fraction=0.3, gpu_bytes=80 * plan.GIB)
    assert colocated.worst("rollout engine") == int(0.3 * 80 * plan.GIB)
    assert not colocated.problems
    assert plan_of(qwen7b, rollout_fraction=0.1).problems  # 15 GB of weights do not fit in 8


def test_invalid_layouts_use_validate_layouts_rules(qwen7b):
    with pytest.raises(ConfigError, match="must divide the model's num_attention_heads=28"):
        plan_of(qwen7b, "parallel.tensor=8")
    with pytest.raises(ConfigError, match="world size 8 must be divisible"):
        plan_of(qwen7b, "parallel.pipeline=7")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    return plan_cli.run(parser.parse_args(list(argv)))


def test_search_lists_layouts_that_fit_best_first(qwen7b, capsys):
    cfg = load_config(None, [f"model.hf_config={qwen7b}"])
    arch = read_hf_config(qwen7b)
    usable = 78 * plan.GIB
    plans = plan.search_layouts(cfg, arch, 8, usable, seq_length=4096)
    assert plans and all(p.worst_rank.total <= usable for p in plans)
    keys = [
        (p.cfg.parallel.tensor * p.cfg.parallel.pipeline, p.cfg.model.recompute_activations)
        for p in plans
    ]
    assert keys == sorted(keys)
    # TP1 x DP8 without recompute needs ~89 GiB (bf16 weights + fp32 grads + logits + 28 layers)
    assert (1, False) not in keys and (1, True) in keys
    assert {p.cfg.parallel.tensor for p in plans} == {1, 2, 4}  # TP8 does not divide 28 heads
    assert cli(str(qwen7b)) == 0  # no layout given: search
    out = capsys.readouterr().out
    assert "TP1 PP1 DP8 dist-opt bf16 recompute" in out.splitlines()[2]
    assert cli(str(qwen7b), "--gpu-gb", "4") == 1
    assert "no layout of 8 GPUs fits in 2.00 GiB per GPU" in capsys.readouterr().out


def test_cli_table_and_errors(qwen7b, capsys):
    assert cli(str(qwen7b), "--tensor", "2", "--pipeline", "2", "--sequence-parallel") == 0
    out = capsys.readouterr().out
    assert "TP2 PP2 DP2 SP dist-opt bf16" in out and "last stage" in out and "fits" in out
    total = plan_of(qwen7b, TP2, PP2, SP).worst_rank.total
    assert f"{total / plan.GIB:.2f} of 78.00 GiB usable" in out
    assert cli(str(qwen7b), "--tensor", "1", "--gpus", "1", "--data", "1") == 1  # 89 GiB
    assert "does NOT fit" in capsys.readouterr().out
    assert cli(str(qwen7b), "--tensor", "3") == 2
    assert "parallel.tensor=3 must divide" in capsys.readouterr().err
    # a run YAML brings its model, layout and batch; flags override them
    assert cli(str(REPO / "examples/configs/demo.yaml"), "--gpus", "2", "--tensor", "2") == 0
    assert "TP2 PP1 DP1 dist-opt fp32 packed 1408 tokens, seq 11" in capsys.readouterr().out


def test_search_respects_the_run_config(qwen7b):
    cfg = load_config(None, [f"model.hf_config={qwen7b}", "model.dtype=fp32"])
    plans = plan.search_layouts(cfg, read_hf_config(qwen7b), 8, 78 * plan.GIB, seq_length=4096)
    assert plans and all(p.cfg.model.dtype == "fp32" for p in plans)
    assert all(p.worst("master weights") == 0 for p in plans)  # fp32 params are the masters
