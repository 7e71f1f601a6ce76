"""The README's main command path: ``sfpo-megatron train`` on the shipped demo config, and
how the CLI fails on bad configs, data and reward functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_ports, srun_env, torchrun

CONFIG = REPO / "examples" / "configs" / "demo.yaml"
# A few quick iterations of the demo: 2 prompts x 4 samples per step, one mini-batch each.
QUICK = [
    "train.prompts_per_step=2",
    "train.samples_per_prompt=4",
    "train.mini_batch_prompts=1",
    "train.micro_batch_size=4",
    "train.warm_start_steps=2",
    "train.dynamic_sampling=false",
    "reward.workers=0",
    "eval.interval=0",
    "logging.log_interval=1",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sfpo_megatron.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_train_prints_progress_and_writes_metrics(tmp_path):
    proc = run_cli(
        "train",
        str(CONFIG),
        *QUICK,
        "train.iterations=3",
        f"logging.output_dir={tmp_path}",
        f"checkpoint.export_hf_dir={tmp_path / 'hf'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("iter ")]
    assert [line.split()[1:3] for line in lines] == [
        ["1/3", "sfpo"],
        ["2/3", "sfpo"],
        ["3/3", "sfpo"],
    ]
    assert "train prompts from" in proc.stdout and "155 of 155 rows" in proc.stdout
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record in records:  # SFPO, K = 3: 3 fast passes + 1 slow pass of 2 mini-batches each
        assert record["optimizer_steps"] == 2 and record["fast_optimizer_steps"] == 6
        assert record["tokens"] > 0 and 0 <= record["reward_mean"] <= 1
        assert 0 < record["grad_norm"] < 100 and abs(record["pg_loss"]) < 10
    # the trained policy, exported at the end, loads in transformers with every weight
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.tie_word_embeddings


def test_same_run_under_tp2_gives_the_same_losses(tmp_path):
    single, tp2 = tmp_path / "single", tmp_path / "tp2"
    # The same padded vocabulary (16) under TP1 and TP2, so the seeded random init is the same.
    args = [*QUICK, "train.iterations=1", "parallel.timeout_s=120", "model.vocab_pad_multiple=8"]
    assert run_cli("train", str(CONFIG), *args, f"logging.output_dir={single}").returncode == 0
    torchrun(
        2,
        REPO / "sfpo_megatron" / "cli.py",
        "train",
        str(CONFIG),
        *args,
        "parallel.tensor=2",
        f"logging.output_dir={tp2}",
    )
    for a, b in zip(read_metrics(single), read_metrics(tp2), strict=True):
        for key in ("pg_loss", "entropy", "grad_norm", "tokens"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key


def test_config_errors_exit_2_with_the_key(tmp_path):
    proc = run_cli("train", str(CONFIG), "parallel.tensor=3")
    assert proc.returncode == 2
    assert "parallel.tensor=3 must divide the model's num_attention_heads=4" in proc.stderr
    proc = run_cli("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


def test_nccl_without_cuda_exits_2_naming_the_backend():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    proc = run_cli("train", str(CONFIG), "parallel.backend=nccl")
    assert proc.returncode == 2
    assert "parallel.backend=nccl needs CUDA" in proc.stderr


def test_slurm_style_launch_without_torchrun(tmp_path):
    """Two tasks started the way srun starts them (SLURM_* variables, no torchrun)."""
    port = free_ports()
    procs = []
    for rank in range(2):
        env = srun_env(rank, 2, port)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sfpo_megatron.cli",
                    "train",
                    str(CONFIG),
                    *QUICK,
                    "train.iterations=1",
                    "parallel.tensor=2",
                    "parallel.timeout_s=120",
                    f"logging.output_dir={tmp_path}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:]
    assert "iter 1/1 sfpo" in outputs[0][0]
    assert read_metrics(tmp_path)[0]["optimizer_steps"] == 2


def write_rows(path, rows: list) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "1+2=", "answer": "3", "data_source": "add"}


def test_malformed_row_stops_with_file_and_line_or_is_skipped_when_asked(tmp_path):
    data = write_rows(tmp_path / "bad.jsonl", [GOOD, GOOD, "{not json\n", GOOD])
    proc = run_cli("train", str(CONFIG), *QUICK, f"data.train_files=[{data}]")
    assert proc.returncode == 2
    assert f"{data}, line 3: invalid JSON" in proc.stderr
    assert not (tmp_path / "log").exists()
    skipped = run_cli(
        "train",
        str(CONFIG),
        *QUICK,
        "train.iterations=1",
        f"data.train_files=[{data}]",
        "data.skip_malformed=true",
        f"logging.output_dir={tmp_path / 'log'}",
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "3 of 4 rows (1 malformed skipped" in skipped.stdout


def test_empty_dataset_and_all_prompts_too_long_are_errors(tmp_path):
    empty = write_rows(tmp_path / "empty.jsonl", [])
    proc = run_cli("train", str(CONFIG), *QUICK, f"data.train_files=[{empty}]")
    assert proc.returncode == 2 and "no usable prompt rows" in proc.stderr
    proc = run_cli("train", str(CONFIG), *QUICK, "data.max_prompt_length=2")
    assert proc.returncode == 2
    assert "all 155 prompts are longer than max_prompt_length=2" in proc.stderr


def test_dataset_smaller_than_a_batch_repeats_prompts(tmp_path):
    """One prompt and two prompts per step: the batch wraps into the next epoch. The row has
    no answer, which data.require_answer=false accepts (as "") without a warm start."""
    data = write_rows(tmp_path / "one.jsonl", [{"prompt": "1+2="}])
    proc = run_cli(
        "train",
        str(CONFIG),
        *QUICK,
        "train.iterations=2",
        f"data.train_files=[{data}]",
        "data.require_answer=false",
        "train.warm_start_steps=0",  # a warm start needs the answers
        f"logging.output_dir={tmp_path / 'log'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in read_metrics(tmp_path / "log")] == [1, 2]


def test_raising_reward_function_scores_zero_and_is_counted(tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(
        "def flaky(response, answer, source):\n"
        "    if len(response) % 2 == 0:  # the one-digit answers pass the start-up probe\n"
        "        raise RuntimeError('bad sample')\n"
        "    return 1.0\n"
    )
    proc = run_cli(
        "train",
        str(CONFIG),
        *QUICK,
        "train.iterations=2",
        f"reward.fn={reward}:flaky",
        "reward.workers=1",
        f"logging.output_dir={tmp_path / 'log'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "log")
    assert sum(r["reward_errors"] for r in records) > 0
    for r in records:  # every sample is either an error (0) or a success (1)
        assert r["reward_mean"] == 1 - r["reward_errors"] / 8


def test_bad_reward_spec_exits_2(tmp_path):
    proc = run_cli("train", str(CONFIG), *QUICK, f"reward.fn={tmp_path / 'none.py'}:fn")
    assert proc.returncode == 2 and "reward.fn" in proc.stderr


def test_bad_inputs_exit_2_before_training(tmp_path):
    """A reward function of the wrong signature or failing its one call, a tokenizer that does
    not round-trip the prompts: exit 2, naming what to fix (a row without an answer is a
    DataError like any malformed row: test_data.py, and the exit code above)."""
    quick = [*QUICK, "train.iterations=1", f"logging.output_dir={tmp_path / 'log'}"]
    two_args = tmp_path / "two.py"
    two_args.write_text("def fn(response, answer):\n    return 1.0\n")
    proc = run_cli("train", str(CONFIG), *quick, f"reward.fn={two_args}:fn")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "reward.fn" in proc.stderr and "fn(response, answer) cannot be called as" in proc.stderr
    assert "fn(response: str, answer: str, source: str) -> float" in proc.stderr

    raising = tmp_path / "raising.py"
    raising.write_text("def fn(response, answer, source):\n    raise KeyError('score')\n")
    proc = run_cli("train", str(CONFIG), *quick, f"reward.fn={raising}:fn")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "raised KeyError: 'score' when called on" in proc.stderr
    assert "problems.jsonl, line 1" in proc.stderr

    from test_tokenizer_check import word_level_beside_qwen2

    model = word_level_beside_qwen2(tmp_path / "model")
    data = write_rows(tmp_path / "sort.jsonl", [{"prompt": "sort 3 9 1 4 =", "answer": "1 3 4 9"}])
    proc = run_cli(
        "train", str(CONFIG), *quick, f"model.hf_config={model}", f"data.train_files=[{data}]"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the tokenizer loaded from {model} (Qwen2Tokenizer)" in proc.stderr
    assert "point data.tokenizer at" in proc.stderr


def test_reward_errors_past_the_limit_stop_every_rank(tmp_path):
    """A function that passes the start-up probe (the answer as the response) but raises on
    other responses: with reward.max_error_fraction=0 the first iteration stops both ranks."""
    reward = tmp_path / "reward.py"
    reward.write_text(
        "def picky(response, answer, source):\n"
        "    if response != answer:\n"
        "        raise ValueError('cannot score')\n"
        "    return 1.0\n"
    )
    port = free_ports()
    args = [*QUICK, "train.iterations=2", "parallel.tensor=2", "parallel.timeout_s=120"]
    args.append(f"logging.output_dir={tmp_path / 'log'}")
    args += [f"reward.fn={reward}:picky", "reward.max_error_fraction=0"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sfpo_megatron.cli", "train", str(CONFIG), *args],
            env=srun_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errors[0][-3000:]
    for stderr in errors:
        assert "samples of this iteration hit a reward error in reward.fn=" in stderr
        assert "reward.max_error_fraction=0:" in stderr and "Traceback" not in stderr
