"""Training checkpoints: a run resumed from a checkpoint in a fresh launch continues bit for
bit like the run that never stopped (model params, fp32 master weights, Adam moments and
step, learning rate, RNG streams, the stored KL reference policy) under every layout below;
only complete checkpoints are ever picked, and another layout's is refused; an asynchronous
save completes at finalize."""

from __future__ import annotations

import json

import pytest
import torch
from layouts import BASE, BF16, NO_DIST_OPT, OVERLAP, PP2, TP2, VPP2

from sfpo_megatron.training.train_checkpoint import (
    LATEST,
    MARKER,
    checkpoint_dir,
    holds_reference,
    latest_complete,
    require_complete,
)

from conftest import TESTS, torchrun, write_hf_config

# A schedule whose LR moves every iteration, so a wrongly restored schedule shows.
RUN = [
    "algorithm.name=grpo",
    "model.load_weights=false",
    "optimizer.lr_schedule=cosine",
    "optimizer.warmup_steps=1",
    "optimizer.min_lr=1e-4",
    "train.iterations=8",
]
# name -> (world size, overrides, asynchronous save)
LAYOUTS = {
    "tp1": (1, [], False),
    "tp1_no_dist_opt": (1, [NO_DIST_OPT], False),
    "tp2": (2, [TP2], False),
    "pp2": (2, [PP2], False),
    "pp2_vpp2": (2, [PP2, VPP2], False),
    "dp2_async": (2, [], True),
    "dp2_bf16_overlap": (2, [BF16, *OVERLAP], False),
    "tp2_bf16_no_dist_opt": (2, [TP2, BF16, NO_DIST_OPT], False),
}
TRAINER_STATE = {"iteration": 2, "cursor": [3, 1]}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Both phases of every layout: one torchrun launch per world size and phase."""
    root = tmp_path_factory.mktemp("train_checkpoint")
    model = write_hf_config(root / "qwen2", "qwen2")
    for world in (1, 2):
        spec = {
            "out": str(root),
            "layouts": {
                name: {
                    "overrides": BASE + RUN + [f"model.hf_config={model}"] + overrides,
                    "async": async_save,
                    **({"foreign": "tp2"} if name == "pp2" else {}),
                }
                for name, (w, overrides, async_save) in LAYOUTS.items()
                if w == world
            },
        }
        (root / f"spec{world}.json").write_text(json.dumps(spec))
        for phase in ("save", "resume"):
            torchrun(
                world,
                TESTS / "dist" / "train_checkpoint_worker.py",
                phase,
                str(root / f"spec{world}.json"),
            )
    return root


def mismatches(a, b, path: str = "") -> list[str]:
    """Paths at which two nested records differ (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        keys = [] if a.keys() == b.keys() else [f"{path} (keys)"]
        return keys + [
            m for k in a.keys() & b.keys() for m in mismatches(a[k], b[k], f"{path}.{k}")
        ]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length)"]
        pairs = enumerate(zip(a, b, strict=True))
        return [m for i, (x, y) in pairs for m in mismatches(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def records(out, name: str) -> list[tuple[dict, dict]]:
    world = LAYOUTS[name][0]
    return [
        tuple(
            torch.load(out / f"{name}.{phase}.rank{r}.pt", weights_only=False)
            for phase in ("save", "resume")
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_is_bit_exact(out, name):
    for saved, resumed in records(out, name):
        assert resumed["trainer_state"] == TRAINER_STATE
        # The resumed actor was built from another seed: everything here came from the load.
        assert mismatches(saved["at_checkpoint"], resumed["at_checkpoint"]) == []
        assert mismatches(saved["draws"], resumed["draws"]) == []
        assert mismatches(saved["after"], resumed["after"]) == []
        # What was compared is real: masters and Adam state exist, and training moved them.
        at, after = saved["at_checkpoint"], saved["after"]
        assert at["masters"] and all(
            state.keys() == {"step", "exp_avg", "exp_avg_sq"} for state in at["adam"]
        )
        assert all(state["step"].item() == 8 for state in after["adam"])
        moved = [
            not torch.equal(a, b) for a, b in zip(at["masters"], after["masters"], strict=True)
        ]
        assert all(moved) and any(
            not torch.equal(at["params"][k], after["params"][k]) for k in at["params"]
        )
        assert after["lr"] != at["lr"] and after["scheduler_steps"] == 4
        # The reference (captured after iteration 1) came back, not the resumed build's.
        assert mismatches(saved["reference"], resumed["reference"]) == []
        params = list(at["params"].values())
        assert len(saved["reference"]) == len(params)
        assert any(not torch.equal(r, p) for r, p in zip(saved["reference"], params, strict=True))


def test_checkpoint_files_and_latest(out):
    for name, (_, _, async_save) in LAYOUTS.items():
        root = out / name
        newest = checkpoint_dir(root, 4 if async_save else 2)
        assert latest_complete(root) == newest
        assert (root / LATEST).read_text() == newest.name
        assert json.loads((newest / "trainer_state.json").read_text())["iteration"] == (
            4 if async_save else 2
        )
        assert require_complete(newest)["iteration"] == int(newest.name[5:])
        assert not list(root.glob("*.partial"))
        assert holds_reference(checkpoint_dir(root, 2))
    assert not holds_reference(checkpoint_dir(out / "dp2_async", 4))  # saved without one
    _, resumed = records(out, "dp2_async")[0]
    expected = f"checkpoint {checkpoint_dir(out / 'dp2_async', 4)} holds no KL reference policy"
    assert resumed["no_reference_error"] == expected


def test_other_layouts_checkpoint_is_refused(out):
    for _, resumed in records(out, "pp2"):
        message = resumed["foreign_error"]
        assert str(checkpoint_dir(out / "tp2", 2)) in message and "'tensor': 2" in message


def test_async_save_completes_at_finalize(out):
    saved, _ = records(out, "dp2_async")[0]
    # Still being written while training goes on: only the finalize makes it complete.
    assert saved["dirs_after_save"] == {"iter_0000002.partial": False}
    assert saved["dirs_after_training"] == {"iter_0000002.partial": False}
    # The next save completes the previous one first.
    assert saved["dirs_after_second_save"] == {"iter_0000002": True, "iter_0000004.partial": False}
    assert saved["dirs_after_finalize"] == {"iter_0000002": True, "iter_0000004": True}


def test_latest_complete_picks_only_complete_checkpoints(tmp_path):
    assert latest_complete(tmp_path / "absent") is None
    assert latest_complete(tmp_path) is None
    for name, marked in [
        ("iter_0000002", True),
        ("iter_0000010", True),
        ("iter_0000011", False),  # no marker: its save never finished
        ("iter_0000012.partial", True),
        ("iter_0000013.partial", False),
    ]:
        (tmp_path / name).mkdir()
        if marked:
            (tmp_path / name / MARKER).write_text("{}")
    (tmp_path / "iter_0000014").write_text("not a directory")
    (tmp_path / LATEST).write_text("iter_0000002")  # a stale pointer does not decide
    assert latest_complete(tmp_path) == tmp_path / "iter_0000010"
    (tmp_path / "iter_12345678").mkdir()
    (tmp_path / "iter_12345678" / MARKER).write_text("{}")
    assert latest_complete(tmp_path) == tmp_path / "iter_12345678"


def test_incomplete_checkpoints_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        require_complete(tmp_path / "absent")
    for name in ("iter_0000003", "iter_0000004.partial"):
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError, match=f"{name}.*incomplete"):
            require_complete(tmp_path / name)
    (tmp_path / "iter_0000004.partial" / MARKER).write_text("{}")
    with pytest.raises(ValueError, match="incomplete"):
        require_complete(tmp_path / "iter_0000004.partial")
