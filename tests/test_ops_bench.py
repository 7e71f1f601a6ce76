"""benchmarks/bench_reposition.py on the CPU, tiny: its check passes and its table adds up."""

import importlib.util
import re

from test_ops import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_reposition", REPO / "benchmarks" / "bench_reposition.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_reposition_cpu_checks_and_reports_speedup(capsys):
    bench = load_bench()
    bench.main(["--device", "cpu", "--elements", "5000", "--tensors", "3", "--check"])
    out = capsys.readouterr().out
    assert "check: reposition_            ours == torch fallback bitwise: ok" in out
    assert "check: snapshot_              ours == torch fallback bitwise: ok" in out
    rows = {
        m[1].strip(): float(m[2])
        for m in re.finditer(r"^(.{34})\s+5000\s+\d+\s+([\d.]+)", out, flags=re.M)
    }
    assert set(rows) >= {"reposition_ (ours)", bench.BASELINE}
    speedup = float(re.search(r"time ratio\): ([\d.]+)x", out)[1])
    ours, baseline = rows["reposition_ (ours)"], rows[bench.BASELINE]  # printed to 0.001 ms
    low, high = (baseline - 5e-4) / (ours + 5e-4), (baseline + 5e-4) / max(ours - 5e-4, 1e-9)
    assert low - 0.005 <= speedup <= high + 0.005


def test_timer_runs_rows_round_robin():
    bench = load_bench()
    calls = []
    timer = bench.Timer(bench.torch.device("cpu"), repeats=3, warmup=1)
    ms = timer([lambda: calls.append("a"), lambda: calls.append("b")])
    assert calls == ["a", "b"] * 4 and len(ms) == 2
