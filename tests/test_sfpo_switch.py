"""The adaptive-alpha switch: z-score per the spec, permanent switch to GRPO that skips the
fast passes, and its state surviving a resume. Driven through SFPOUpdate with a stand-in
actor whose training passes report a scripted entropy and count optimizer steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfpo_megatron.algorithms.sfpo import EntropySwitch, SFPOUpdate
from sfpo_megatron.config import SFPOConfig
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


def run(update, actor, entropies):
    """One update per entropy value; the 'batch' handed through is the entropy to report."""
    steps = []
    for entropy in entropies:
        before = actor.optimizer_steps
        update.step(entropy)
        steps.append(actor.optimizer_steps - before)
    return steps


def test_z_score_matches_the_formula():
    cfg = SFPOConfig(window=4, tau=10.0)
    switch = EntropySwitch(cfg)
    series = [1.0, 1.2, 0.9, 1.1, 1.5, 1.3]
    zs = [switch.observe(i, h) for i, h in enumerate(series, 1)]
    assert zs[:3] == [None, None, None]
    for i in range(3, len(series)):
        window = np.array(series[i - 3 : i + 1])
        assert zs[i] == pytest.approx((series[i] - window.mean()) / (window.std() + 1e-9))
    assert not switch.switched


@pytest.mark.parametrize("one_sided, dip_switches", [(True, False), (False, True)])
def test_one_and_two_sided_rules(one_sided, dip_switches):
    switch = EntropySwitch(SFPOConfig(window=5, tau=1.0, one_sided=one_sided))
    for i, h in enumerate([1.0, 1.01, 0.99, 1.0, 0.5], 1):  # a downward spike: Z ~ -2
        switch.observe(i, h)
    assert switch.switched == dip_switches


def test_switch_skips_fast_passes_for_good_and_survives_resume():
    cfg = SFPOConfig(inner_steps=3, alpha=0.5, window=4, tau=1.0)
    flat = [1.0, 1.01, 0.99, 1.0, 1.005]  # z stays small
    spike = [2.0]  # Z >= 1 at iteration 6
    after = [1.0, 1.0, 1.0]
    actor = ScriptedActor()
    update = SFPOUpdate(actor, cfg)
    steps = run(update, actor, flat + spike)
    assert steps == [(3 + 1) * STEPS_PER_PASS] * 6  # the spike iteration itself is still SFPO
    assert update.switch.switched_at == 6 and not update.active

    saved = update.state_dict()
    steps_after = run(update, actor, after)
    assert steps_after == [STEPS_PER_PASS] * 3  # GRPO: no fast pass, no reposition

    resumed_actor = ScriptedActor()
    resumed = SFPOUpdate(resumed_actor, cfg)
    resumed.load_state_dict(saved)
    assert not resumed.active and resumed.iteration == 6
    assert run(resumed, resumed_actor, after) == [STEPS_PER_PASS] * 3
    assert resumed_actor.weights.alone[0].sum() == 3 * STEPS_PER_PASS * 5  # never repositioned


def test_reposition_lands_on_the_formula():
    cfg = SFPOConfig(inner_steps=3, alpha=0.25, adaptive=False)
    actor = ScriptedActor()
    update = SFPOUpdate(actor, cfg)
    metrics = update.step(1.0)
    # theta0 = 0, thetaK = 3 passes x 2 steps = 6, theta~ = 0.25 * 6 = 1.5, then +2 slow steps
    assert torch.equal(actor.weights.alone[0], torch.full((5,), 3.5))
    assert metrics["fast_optimizer_steps"] == 6 and metrics["sfpo_active"] == 1.0
    assert "entropy_z" not in metrics
    phases = ("time_snapshot", "time_fast", "time_reposition", "time_slow")
    assert all(metrics[k] >= 0 for k in phases)
    assert metrics["time_snapshot"] <= metrics["time_fast"]  # the snapshot is inside it


def test_non_finite_entropy_is_an_error():
    switch = EntropySwitch(SFPOConfig(window=3))
    with pytest.raises(FloatingPointError, match="iteration 2"):
        switch.observe(1, 1.0)
        switch.observe(2, math.nan)
