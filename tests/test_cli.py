"""The README's main command path: ``sfpo-megatron train`` on the shipped tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, free_port, torchrun

CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


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
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record in records:  # SFPO, K = 3: 3 fast passes + 1 slow pass of 2 mini-batches each
        assert record["optimizer_steps"] == 2 and record["fast_optimizer_steps"] == 6
        assert record["tokens"] > 0
        assert 0 < record["grad_norm"] < 100 and abs(record["pg_loss"]) < 10
    # the trained policy, exported at the end, loads in transformers with every weight
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.tie_word_embeddings


def test_same_run_under_tp2_gives_the_same_losses(tmp_path):
    single, tp2 = tmp_path / "single", tmp_path / "tp2"
    args = ["train.iterations=2", "parallel.timeout_s=120"]
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


def test_slurm_style_launch_without_torchrun(tmp_path):
    """Two tasks started the way srun starts them (SLURM_* variables, no torchrun)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost",
            "MASTER_PORT": str(port),
        }
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sfpo_megatron.cli",
                    "train",
                    str(CONFIG),
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
