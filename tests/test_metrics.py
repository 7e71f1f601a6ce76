"""MetricsLog: metrics.jsonl, resume truncation, rank 0 only, TensorBoard, W&B, progress line."""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest

from sfpo_megatron.common import files as files_mod
from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import LoggingConfig
from sfpo_megatron.training import metrics as metrics_mod
from sfpo_megatron.training.metrics import (
    MetricsFileError,
    MetricsLog,
    format_duration,
    read_metrics,
)

RUN_CONFIG = {"algorithm": {"name": "sfpo", "sfpo": {"alpha": 0.8}}, "train": {"iterations": 5}}


def make_log(tmp_path, total=5, resume_from=0, **cfg) -> MetricsLog:
    cfg = LoggingConfig(output_dir=str(tmp_path), **cfg)
    return MetricsLog(cfg, total, RUN_CONFIG, resume_from=resume_from)


def lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_has_one_flushed_object_per_call_and_the_config(tmp_path, capsys):
    log = make_log(tmp_path)
    log.log(1, {"reward_mean": 0.5, "entropy": 1.25})
    # readable before close: every line is flushed at once
    assert lines(tmp_path) == [{"iteration": 1, "reward_mean": 0.5, "entropy": 1.25}]
    log.log(1, {"eval/gsm8k": 0.25, "eval/macro": 0.25})
    log.log(2, {"reward_mean": 0.75})
    log.close()
    log.close()
    assert lines(tmp_path) == [
        {"iteration": 1, "reward_mean": 0.5, "entropy": 1.25},
        {"iteration": 1, "eval/gsm8k": 0.25, "eval/macro": 0.25},
        {"iteration": 2, "reward_mean": 0.75},
    ]
    assert json.loads((tmp_path / "config.json").read_text()) == RUN_CONFIG
    # a fresh run starts an empty file even where an old one was
    make_log(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_keeps_lines_up_to_the_checkpoint_and_rewrites_atomically(tmp_path, monkeypatch):
    log = make_log(tmp_path, total=10)
    for i in range(1, 7):
        log.log(i, {"reward_mean": i / 10})
    log.log(4, {"eval/macro": 0.5})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 7, "rew')  # killed in the middle of a write

    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", spy_replace)
    log = make_log(tmp_path, total=10, resume_from=4)
    target = str(tmp_path / "metrics.jsonl")
    assert (target + ".tmp", target) in replaced
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    log.log(5, {"reward_mean": 0.55})
    log.close()
    got = lines(tmp_path)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 4, 5]
    assert got[-1]["reward_mean"] == 0.55 and got[4] == {"iteration": 4, "eval/macro": 0.5}


def test_read_metrics_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl:2: malformed JSON"):
        read_metrics(path)
    path.write_text('{"iteration": 1}\n{"iteration": "x"}\n')
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl:2: .*integer iteration"):
        read_metrics(path)
    # a torn final line (no newline) is dropped, a complete bad final line is not
    path.write_text('{"iteration": 1}\n{"iter')
    assert read_metrics(path) == [{"iteration": 1}]
    path.write_text('{"iteration": 1}\n{"iter\n')
    with pytest.raises(MetricsFileError, match=":2:"):
        read_metrics(path)


def test_ranks_other_than_zero_write_and_print_nothing(tmp_path, monkeypatch, capsys, cli_logging):
    monkeypatch.setattr(metrics_mod, "global_rank", lambda: 1)
    log = make_log(tmp_path / "out", total=1, tensorboard=True, wandb_project="p")
    log.log(1, {"reward_mean": 0.5})
    log.close()
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


def test_tensorboard_scalars_are_readable_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = make_log(tmp_path, total=4, tensorboard=True)
    for i in (1, 2, 3):
        log.log(i, {"reward_mean": i * 0.25, "eval/macro": 0.5 + i, "note": "skip me"})
    log.close()
    log = make_log(tmp_path, total=4, tensorboard=True, resume_from=2)
    log.log(3, {"reward_mean": 0.9})
    log.log(4, {"reward_mean": 1.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "note" not in events.Tags()["scalars"]
    reward = [(e.step, round(e.value, 6)) for e in events.Scalars("reward_mean")]
    # the first run's step 3 was purged: the resumed run replaced it
    assert reward == [(1, 0.25), (2, 0.5), (3, 0.9), (4, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/macro")] == [(1, 1.5), (2, 2.5)]

    # a fresh run in the same directory hides all of the old events
    log = make_log(tmp_path, total=4, tensorboard=True)
    log.log(1, {"reward_mean": -1.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, -1.0)]


class FakeWandb(types.ModuleType):
    """Records what MetricsLog asks of ``wandb``."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_gets_config_steps_and_reuses_its_id_on_resume(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = make_log(tmp_path, total=3, wandb_project="sfpo-test")
    log.log(1, {"reward_mean": 0.5})
    log.log(1, {"eval/macro": 0.25})
    log.close()
    first = fake.inits[0]
    assert first["project"] == "sfpo-test" and first["config"] == RUN_CONFIG
    assert first["dir"] == str(tmp_path) and first["resume"] == "allow"
    assert (tmp_path / "wandb_id").read_text().strip() == first["id"]
    assert fake.logged == [(1, {"reward_mean": 0.5}), (1, {"eval/macro": 0.25})]
    assert fake.finished == 1

    make_log(tmp_path, total=3, wandb_project="sfpo-test", resume_from=1).close()
    assert fake.inits[1]["id"] == first["id"]
    make_log(tmp_path, total=3, wandb_project="sfpo-test").close()  # a fresh run: a new id
    assert fake.inits[2]["id"] != first["id"]


def test_missing_wandb_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(ConfigError, match=r"logging\.wandb_project='p' needs the wandb package"):
        make_log(tmp_path, wandb_project="p")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n'  # left as it was


FULL = {
    "sfpo_active": 1.0,
    "alpha": 0.8,
    "reward_mean": 0.4123,
    "accuracy": 0.406,
    "entropy": 1.2341,
    "entropy_z": 0.314,
    "response_length": 12.34,
    "rollouts": 3072,
    "tokens_per_s": 2345.4,
    "pg_loss": 0.01,
    "time_rollout": 1.21,
    "time_reward": 0.12,
    "time_old_logprobs": 0.31,
    "time_update": 2.14,
    "time_fast": 1.5,
    "time_sync": 0.2,
    "seconds": 4.08,
}


def test_progress_line_format(tmp_path):
    log = make_log(tmp_path, total=100)
    log.start = time.perf_counter() - 12 * 4.1  # 12 iterations of 4.1 s: 88 x 4.1 s to go
    assert log.progress_line(12, FULL) == (
        "iter 12/100 sfpo a=0.80 reward 0.412 acc 0.406 entropy 1.234 z +0.31 len 12.3 "
        "rollouts 3072 tok/s 2345 | rollout 1.2s reward 0.1s logp 0.3s update 2.1s sync 0.2s | "
        "4.1s/it eta 6m01s"
    )


def test_progress_line_names_a_slow_rollout_engine(tmp_path):
    log = make_log(tmp_path, total=10, resume_from=10)
    engines = {
        "time_rollout_engine0": 1.0,
        "time_rollout_engine1": 1.2,
        "time_rollout_engine2": 1.1,
    }
    assert log.progress_line(10, {"entropy": 0.5, **engines}) == "iter 10/10 sfpo entropy 0.500"
    engines["time_rollout_engine2"] = 1.8  # 1.64x the median of the others (1.1 s)
    assert log.progress_line(10, {"entropy": 0.5, "time_rollout": 2.0, **engines}) == (
        "iter 10/10 sfpo entropy 0.500 | engine 2 slow 1.6x | rollout 2.0s"
    )
    assert log.progress_line(10, {"time_rollout_engine0": 9.0}) == "iter 10/10"


def test_progress_line_survives_missing_keys(tmp_path):
    log = make_log(tmp_path, total=10, resume_from=10)  # no iteration run here: no eta
    after_switch = {"sfpo_active": 0.0, "alpha": 0.8, "entropy": 0.5, "note": "text"}
    assert log.progress_line(10, after_switch) == "iter 10/10 grpo entropy 0.500"
    # GRPO runs log no sfpo_active: the algorithm comes from the run config
    assert log.progress_line(10, {"entropy": 0.5}) == "iter 10/10 sfpo entropy 0.500"
    evaluation = {"eval/math": 0.25, "eval/macro": 0.375, "time_eval": 3.0}
    assert log.progress_line(10, evaluation) == (
        "iter 10/10 | eval macro 0.375 math 0.250 | eval 3.0s"
    )
    assert log.progress_line(10, {}) == "iter 10/10"


def test_progress_printed_every_interval_at_the_end_and_for_evals(tmp_path, capsys, cli_logging):
    log = make_log(tmp_path, total=7, log_interval=3)
    for i in range(1, 8):
        log.log(i, {"entropy": 1.0})
    log.log(4, {"eval/macro": 0.5})
    log.close()
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == ["3/7", "6/7", "7/7", "4/7"]


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 362, 3725)] == ["4s", "6m02s", "1h02m"]
