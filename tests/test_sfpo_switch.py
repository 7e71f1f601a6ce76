"""The entropy switch: z-score per the spec, permanent switch to GRPO that skips the fast
passes, and its state surviving a resume; the UpdateResult that GRPO and SFPO both return.
Driven through the updates with a stand-in actor whose training passes report a scripted
entropy and count optimizer steps."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from sfpo_megatron.algorithms import UpdateResult, build_update
from sfpo_megatron.algorithms import sfpo as sfpo_module
from sfpo_megatron.algorithms.grpo import GRPOUpdate
from sfpo_megatron.algorithms.sfpo import SFPOUpdate
from sfpo_megatron.algorithms.switch import EntropySwitch
from sfpo_megatron.config import AlgorithmConfig, SFPOConfig
from sfpo_megatron.policy.optim import MasterWeights

STEPS_PER_PASS = 2


class ScriptedActor:
    """Stands in for Actor: fp32 master weights that each 'optimizer step' moves by +1; the
    'batch' a pass is given is the entropy it reports."""

    def __init__(self):
        self.weights = MasterWeights([], [], [torch.zeros(5), torch.zeros(3)])
        self.optimizer_steps = 0

    def master_weights(self):
        return self.weights

    def publish_master_weights(self):
        pass

    def train_pass(self, batch, before_step=None):
        for _ in range(STEPS_PER_PASS):
            if before_step is not None:
                before_step()
            for w in self.weights.alone:
                w.add_(1.0)
            self.optimizer_steps += 1
        return {"optimizer_steps": STEPS_PER_PASS, "entropy": batch}


def run(update, actor, entropies, results=None):
    """One update per entropy value; the 'batch' handed through is the entropy to report.
    Returns the optimizer steps of each; ``results`` collects the UpdateResults."""
    steps = []
    for entropy in entropies:
        before = actor.optimizer_steps
        result = update.step(entropy)
        if results is not None:
            results.append(result)
        steps.append(actor.optimizer_steps - before)
    return steps


def test_z_score_matches_the_formula():
    cfg = SFPOConfig(window=4, tau=10.0)
    switch = EntropySwitch(cfg)
    series = [1.0, 1.2, 0.9, 1.1, 1.5, 1.3]
    zs = [switch.observe(h) for h in series]
    assert zs[:3] == [None, None, None]
    for i in range(3, len(series)):
        window = np.array(series[i - 3 : i + 1])
        assert zs[i] == pytest.approx((series[i] - window.mean()) / (window.std() + 1e-9))
    assert not switch.switched


@pytest.mark.parametrize("one_sided, dip_switches", [(True, False), (False, True)])
def test_one_and_two_sided_rules(one_sided, dip_switches):
    switch = EntropySwitch(SFPOConfig(window=5, tau=1.0, one_sided=one_sided))
    for h in [1.0, 1.01, 0.99, 1.0, 0.5]:  # a downward spike: Z ~ -2
        switch.observe(h)
    assert switch.switched == dip_switches


def test_switch_skips_fast_passes_for_good_and_survives_resume():
    cfg = SFPOConfig(inner_steps=3, alpha=0.5, window=4, tau=1.0)
    flat = [1.0, 1.01, 0.99, 1.0, 1.005]  # z stays small
    spike = [2.0]  # Z >= 1 at iteration 6
    after = [1.0, 1.0, 1.0]
    actor = ScriptedActor()
    update = SFPOUpdate(actor, cfg)
    results = []
    steps = run(update, actor, flat + spike, results)
    assert steps == [(3 + 1) * STEPS_PER_PASS] * 6  # the spike iteration itself is still SFPO
    assert [r.switched for r in results] == [False] * 5 + [True]  # switched at iteration 6
    assert update.switched

    saved = update.state_dict()
    steps_after = run(update, actor, after)
    assert steps_after == [STEPS_PER_PASS] * 3  # GRPO: no fast pass, no reposition

    resumed_actor = ScriptedActor()
    resumed = SFPOUpdate(resumed_actor, cfg)
    resumed.load_state_dict(saved)
    assert resumed.switched and resumed.state_dict() == saved
    assert run(resumed, resumed_actor, after) == [STEPS_PER_PASS] * 3
    assert resumed_actor.weights.alone[0].sum() == 3 * STEPS_PER_PASS * 5  # never repositioned


def test_reposition_lands_on_the_formula():
    cfg = SFPOConfig(inner_steps=3, alpha=0.25, switch_to_grpo=False)
    actor = ScriptedActor()
    update = SFPOUpdate(actor, cfg)
    metrics = update.step(1.0).metrics
    # theta0 = 0, thetaK = 3 passes x 2 steps = 6, theta~ = 0.25 * 6 = 1.5, then +2 slow steps
    assert torch.equal(actor.weights.alone[0], torch.full((5,), 3.5))
    assert metrics["fast_optimizer_steps"] == 6 and metrics["sfpo_active"] == 1.0
    assert "entropy_z" not in metrics
    phases = ("time_snapshot", "time_fast", "time_reposition", "time_slow")
    assert all(metrics[k] >= 0 for k in phases)
    assert metrics["time_snapshot"] <= metrics["time_fast"]  # the snapshot is inside it


def test_non_finite_entropy_is_an_error():
    switch = EntropySwitch(SFPOConfig(window=3))
    switch.observe(1.0)
    with pytest.raises(FloatingPointError, match="entropy is nan"):
        switch.observe(math.nan)


def test_grpo_result_applies_no_alpha():
    actor = ScriptedActor()
    result = GRPOUpdate(actor).step(0.7)
    assert isinstance(result, UpdateResult)
    assert result.metrics == {"optimizer_steps": STEPS_PER_PASS, "entropy": 0.7}
    assert (result.alpha, result.slow_fast, result.switched) == (0.0, False, False)
    assert actor.optimizer_steps == STEPS_PER_PASS


def test_sfpo_result_before_at_and_after_the_switch():
    cfg = SFPOConfig(inner_steps=2, alpha=0.5, window=3, tau=1.0)
    actor, results = ScriptedActor(), []
    run(SFPOUpdate(actor, cfg), actor, [1.0, 1.01, 5.0, 1.0], results)
    faces = [(r.alpha, r.slow_fast, r.switched) for r in results]
    assert faces == [(0.5, True, False), (0.5, True, False), (0.5, True, True), (0.0, False, True)]
    assert [r.metrics["sfpo_active"] for r in results] == [1.0, 1.0, 1.0, 0.0]
    assert "entropy_z" not in results[1].metrics and results[2].metrics["entropy_z"] > 1.0


def test_sfpo_without_the_switch_never_switches():
    cfg = SFPOConfig(inner_steps=1, alpha=0.3, window=2, tau=0.1, switch_to_grpo=False)
    actor, results = ScriptedActor(), []
    run(SFPOUpdate(actor, cfg), actor, [1.0, 9.0, 1.0], results)
    assert [(r.alpha, r.slow_fast, r.switched) for r in results] == [(0.3, True, False)] * 3


@pytest.mark.parametrize("name, kind", [("grpo", GRPOUpdate), ("sfpo", SFPOUpdate)])
def test_build_update_picks_by_name(name, kind):
    sfpo = SFPOConfig(alpha=0.4)
    update = build_update(AlgorithmConfig(name=name, sfpo=sfpo), ScriptedActor())
    assert type(update) is kind
    assert update.step(1.0).alpha == (0.4 if name == "sfpo" else 0.0)


@pytest.mark.parametrize("rank, logs", [(0, 1), (1, 0)])
def test_switch_is_logged_once_on_global_rank_0(monkeypatch, caplog, rank, logs):
    monkeypatch.setattr(sfpo_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sfpo_module.dist, "get_rank", lambda: rank)
    actor = ScriptedActor()
    update = SFPOUpdate(actor, SFPOConfig(inner_steps=1, window=2, tau=0.5))
    with caplog.at_level(logging.WARNING, logger=sfpo_module.__name__):
        run(update, actor, [1.0, 2.0, 1.0, 3.0])
    assert update.switched
    assert sum("crossed tau" in r.getMessage() for r in caplog.records) == logs
