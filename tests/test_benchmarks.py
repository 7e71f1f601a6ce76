"""The GPU benchmark scripts run end to end on the CPU with the tiny preset, and the numbers in
their tables agree with the formulas their output states."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table(stdout: str) -> list[dict[str, str]]:
    """The markdown table's rows as {column: cell}; the separator row must follow the header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, separator, *rows = cells
    assert all(re.fullmatch(r":?-+:?", c) for c in separator)
    assert rows and all(len(row) == len(header) for row in rows)
    return [dict(zip(header, row, strict=True)) for row in rows]


def tiny_matmul_params() -> int:
    """GEMM parameters of the tiny preset counted by hand: vocab 300 padded to 384, hidden 64,
    2 layers, 4 heads of 16, 2 KV heads, FFN 96 (SwiGLU), untied output layer."""
    hidden, ffn, kv_width, vocab = 64, 96, 2 * 2 * 16, 384
    qkv = hidden * (hidden + kv_width) + hidden + kv_width
    layer = qkv + hidden * hidden + hidden * 2 * ffn + ffn * hidden + 2 * hidden
    return 2 * layer + hidden + vocab * hidden


def test_bench_actor_tiny_cpu():
    out = run_script(
        "bench_actor.py", "--preset", "tiny", "--seq-length", "32", "64", "--steps", "2"
    )
    n_matmul = tiny_matmul_params()
    assert f"N_matmul={n_matmul}, L=2, d_attn=64, R=4" in out
    rows = table(out)
    assert list(rows[0]) == [
        "seq",
        "tokens/step",
        "s/step",
        "tokens/s",
        "model TFLOP/s",
        "peak TFLOP/s",
        "% peak",
        "peak mem GiB",
        "plan GiB",
        "plan error",
    ]
    assert [int(r["seq"]) for r in rows] == [32, 64]
    for row in rows:
        seq, tokens, seconds = int(row["seq"]), int(row["tokens/step"]), float(row["s/step"])
        assert tokens == 4 * seq  # 4 micro-batches x 1 row
        assert seconds > 0
        assert float(row["tokens/s"]) == pytest.approx(tokens / seconds, rel=1e-3)
        flops = 6 * n_matmul * tokens + 6 * 2 * seq**2 * 64 * 4
        tflops = float(row["model TFLOP/s"])
        assert tflops == pytest.approx(flops / seconds / 1e12, rel=1e-3)
        peak = float(row["peak TFLOP/s"])
        assert peak > 0
        assert float(row["% peak"]) == pytest.approx(100 * tflops / peak, abs=0.051)
        assert row["peak mem GiB"] == row["plan error"] == "-"  # CUDA only
        assert float(row["plan GiB"]) >= 0


def test_bench_generate_tiny_cpu():
    out = run_script(
        "bench_generate.py",
        *("--preset", "tiny", "--batch", "3", "--prompt-len", "8", "--new-tokens", "12"),
    )
    (row,) = table(out)
    assert list(row) == [
        "batch",
        "prompt len",
        "new tokens",
        "seconds",
        "tokens/s",
        "prefill s",
        "ms/decode step",
    ]
    assert (row["batch"], row["prompt len"], row["new tokens"]) == ("3", "8", "12")
    seconds, prefill = float(row["seconds"]), float(row["prefill s"])
    assert seconds > prefill > 0
    assert float(row["tokens/s"]) == pytest.approx(3 * 12 / seconds, rel=1e-3)
    assert float(row["ms/decode step"]) == pytest.approx((seconds - prefill) / 11 * 1e3, rel=1e-3)


def test_bench_generate_long_tail_tiny_cpu():
    """Static vs continuous batching and 1 vs 2 engine processes on the same long-tail rows
    (the script itself checks that every way gives the same tokens)."""
    out = run_script(
        "bench_generate.py",
        *("--long-tail", "--preset", "tiny", "--batch", "40", "--slots", "4"),
        *("--prompt-len", "16", "--new-tokens", "40"),
    )
    stats = re.search(r"mean ([\d.]+) = ([\d.]+)% of the cap, ([\d.]+)% at the cap", out)
    mean, share, at_cap = map(float, stats.groups())
    assert share == pytest.approx(100 * mean / 40, abs=0.2) and 10 < share < 45 and at_cap > 0
    rows = table(out)
    assert [(r["batching"], r["engines"], r["threads each"]) for r in rows] == [
        ("static", "1", "1"),
        ("continuous", "1", "1"),
        ("continuous", "1", "1"),
        ("continuous", "2", "1"),
    ]
    seconds = [float(r["seconds"]) for r in rows]
    assert all(float(r["CPU s"]) > 0 for r in rows)
    tokens = float(rows[0]["tokens/s"]) * seconds[0]
    for row, s in zip(rows, seconds, strict=True):
        assert float(row["tokens/s"]) * s == pytest.approx(tokens, rel=1e-3)
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"continuous batching speed-up: ([\d.]+)x; 2 engines vs 1: ([\d.]+)x", last
    )
    assert match, last
    assert float(match[1]) == pytest.approx(seconds[0] / seconds[1], rel=0.01, abs=0.01)
    assert float(match[2]) == pytest.approx(seconds[2] / seconds[3], rel=0.01, abs=0.01)


def test_generate_rejects_a_single_new_token():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--new-tokens must be >= 2" in proc.stderr


def test_bench_iteration_tiny_cpu(tmp_path):
    """Both runs train, every phase is reported, SFPO's update is split into its parts, and the
    shares are of the SFPO iteration."""
    out = run_script(
        "bench_iteration.py",
        *("--preset", "tiny", "--prompts", "2", "--samples", "2", "--prompt-len", "4"),
        *("--response-len", "4", "--iterations", "2", "--micro-batch-size", "2"),
        *("--out", str(tmp_path)),
    )
    rows = {row["phase"]: row for row in table(out)}
    assert list(rows)[0] == "rollout" and list(rows)[-1] == "whole iteration"
    for phase in ("update: snapshot", "update: fast passes", "update: reposition"):
        assert rows[phase]["GRPO ms"] == "-" and float(rows[phase]["SFPO ms"]) >= 0
    whole = float(rows["whole iteration"]["SFPO ms"])
    parts = [float(r["SFPO ms"]) for name, r in rows.items() if name != "whole iteration"]
    assert 0 < sum(parts) <= whole
    assert rows["whole iteration"]["% of SFPO iteration"] == "100.00"
    for row in rows.values():  # ms (the row's and the whole's) to 0.05, shares to 0.005
        share = 100 * float(row["SFPO ms"]) / whole
        assert float(row["% of SFPO iteration"]) == pytest.approx(share, abs=10 / whole + 0.006)
    for algorithm in ("grpo", "sfpo"):
        assert (tmp_path / algorithm / "metrics.jsonl").is_file()
    assert "SFPO's own cost (snapshot + reposition):" in out


def test_bench_iteration_off_policy_tiny_cpu(tmp_path):
    """0 and 1 step off-policy for both algorithms, rollouts from a server process: one row
    each, the overlap is the sum of the phases over the wall-clock, and the last line is the
    speed-up of the rows' seconds."""
    out = run_script(
        "bench_iteration.py",
        *("--off-policy", "1", "--prompts", "2", "--samples", "2", "--prompt-len", "4"),
        *("--response-len", "4", "--iterations", "2", "--micro-batch-size", "2"),
        *("--out", str(tmp_path)),
    )
    rows = {row["run"]: row for row in table(out)}
    assert list(rows) == [f"{a}, off_policy_steps={s}" for a in ("SFPO", "GRPO") for s in (0, 1)]
    phases = ["rollout s", "reward s", "old log-probs s", "update s", "sync s"]
    for name, row in rows.items():
        seconds = float(row["s/iteration"])
        overlap = sum(float(row[p]) for p in phases) / seconds
        assert float(row["overlap"]) == pytest.approx(overlap, abs=0.01 + 0.003 / seconds)
        waited = float(row["waited for rollouts s"])
        assert waited == 0 if name.endswith("=0") else waited >= 0
    share = re.search(r"rollout phase of a sequential SFPO iteration: ([\d.]+)%", out)
    sfpo = rows["SFPO, off_policy_steps=0"]
    rollout, seconds = float(sfpo["rollout s"]), float(sfpo["s/iteration"])
    expected = 100 * rollout / seconds
    rounding = expected * (0.0005 / rollout + 0.0005 / seconds) + 0.05  # 3 and 1 digits
    assert float(share[1]) == pytest.approx(expected, abs=rounding)
    last = re.fullmatch(
        r"off-policy overlap speed-up: ([\d.]+)x \(SFPO\), ([\d.]+)x \(GRPO\)",
        out.strip().splitlines()[-1],
    )
    assert last
    for value, algorithm in zip(last.groups(), ("SFPO", "GRPO"), strict=True):
        sequential = float(rows[f"{algorithm}, off_policy_steps=0"]["s/iteration"])
        overlapped = float(rows[f"{algorithm}, off_policy_steps=1"]["s/iteration"])
        ratio = sequential / overlapped
        rounding = ratio * (0.0005 / sequential + 0.0005 / overlapped) + 0.005  # 3 and 2 digits
        assert float(value) == pytest.approx(ratio, abs=rounding)
    staleness = [
        json.loads(line)["rollout_staleness"]
        for line in (tmp_path / "sfpo_off_policy_1/metrics.jsonl").open()
    ]
    assert staleness == [0, 1]


def test_bench_weight_sync_tiny_cpu():
    args = ("--hidden", "128", "--layers", "2", "--vocab", "300", "--repeats", "1")
    out = run_script("bench_weight_sync.py", *args, "--weight-format", "fp8")
    lines = out.splitlines()
    elements = int(re.search(r"([\d,]+) params, fp32 = ", out).group(1).replace(",", ""))
    found = re.search(r"fp32 \S+ MiB, fp8 \S+ MiB \((\S+)x\); linear .* \((\S+)x\)", out)
    ratio, linear_ratio = map(float, found.groups())
    # Linear weights shrink 4x from fp32, plus one fp32 scale per 128 x 128 block (here 1 or
    # 2 per weight); the 300 x 128 embedding and lm_head, norms and biases keep their size.
    assert linear_ratio == 0.25 and 0.3 < ratio < 0.4  # printed to 3 digits
    rows = lines[lines.index(next(line for line in lines if line.startswith("transport"))) + 1 :]
    transports = [
        "in-process (embedded engine)",
        "HTTP + gloo broadcast (64 MB buckets)",
        "colocated, shared memory (64 MB buckets)",
    ]
    assert [row.split("  ")[0] for row in rows] == [
        "copy_ of the same bytes on the device (reference)",
        *(name + suffix for name in transports for suffix in ("", ", fp8")),
    ]
    for row in rows:
        seconds, gbps = map(float, row.split()[-2:])
        if ", fp8" not in row:
            assert gbps == pytest.approx(4 * elements / seconds / 1e9, rel=0.01)


def test_bench_packing_tiny_cpu():
    out = run_script(
        "bench_packing.py", *("--preset", "tiny", "--rows", "10", "--max-response", "64")
    )
    batch = re.search(r"at the cap; longest row (\d+) tokens, (\d+) useful tokens", out)
    assert batch and "1 rows (10%) at the cap" in out
    longest, useful = int(batch[1]), int(batch[2])
    packed, padded = table(out)
    assert (packed["cut"], padded["cut"]) == ("packed", "padded")
    assert int(padded["processed tokens"]) == 10 * longest  # 5 micro-batches x 2 full rows
    assert int(packed["processed tokens"]) == useful  # one rank, no TP/PP: no padding at all
    for row in (packed, padded):
        ratio = int(row["processed tokens"]) / useful
        assert float(row["processed/useful"]) == pytest.approx(ratio, abs=0.006)
    last = re.fullmatch(
        r"packing speed-up: ([\d.]+)x \(train pass\), ([\d.]+)x \(forward\); "
        r"processed/useful tokens: padded ([\d.]+), packed ([\d.]+)",
        out.strip().splitlines()[-1],
    )
    assert last, out.strip().splitlines()[-1]
    assert float(last[1]) > 0 and float(last[2]) > 0  # timings: the benchmark's to judge
    assert (last[3], last[4]) == (padded["processed/useful"], packed["processed/useful"])


def test_off_policy_demo_reuses_finished_runs(tmp_path):
    """Finished runs in --out are read, not retrained; the table's means, shares, gaps and
    training seconds (evaluations left out) follow from their metrics."""
    finals = {("on-policy", 1): 0.5, ("on-policy", 2): 0.4}
    finals |= {("off-policy", 1): 0.45, ("off-policy", 2): 0.36}
    for (name, seed), final in finals.items():
        directory = tmp_path / f"{name}-{seed}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"train": {"iterations": 2}}))
        gap = 0.2 if name == "off-policy" else 0.0
        records = [
            {"iteration": 1, "seconds": 3.0, "rollout_logprob_gap": gap},
            {"iteration": 2, "seconds": 5.0, "rollout_logprob_gap": 2 * gap},
        ]
        records[-1].update({"eval/macro": final, "time_eval": 1.0})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_script("off_policy_demo.py", "--seeds", "1", "2", "--out", str(tmp_path))
    rows = {row["run"]: row for row in table(out)}
    assert rows["on-policy"]["mean"] == "0.450" and rows["on-policy"]["% of on-policy"] == "100%"
    assert rows["off-policy"]["mean"] == "0.405" and rows["off-policy"]["% of on-policy"] == "90%"
    assert rows["off-policy"]["seed 2 final eval"] == "0.360"
    assert float(rows["off-policy"]["log-prob gap"]) == pytest.approx(0.3)
    assert rows["on-policy"]["training s"] == "7"  # 3 + 5 - 1 s of evaluation
    assert out.strip().splitlines()[-1] == "off-policy demo accuracy: 90% of on-policy (seeds 1 2)"
    assert not list(tmp_path.glob("*/server.log"))
