"""``sfpo-megatron plot``: figures from synthetic GRPO / SFPO runs, files, and its errors."""

from __future__ import annotations

import json
import sys

import pytest

from sfpo_megatron import cli
from sfpo_megatron.tools.plot import PlotError, Run, build_figures, load_run

SWITCH = 7
ITERATIONS = 12


def write_run(directory, algorithm: str, records: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"algorithm": {"name": algorithm}}))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def rollouts(i: int, algorithm: str) -> int:
    """Cumulative samples after iteration ``i``: the SFPO run samples an extra round on even
    iterations (dynamic sampling), so its count is not proportional to the iteration."""
    per_round = 32
    if algorithm == "sfpo":
        return per_round * (i + i // 2)
    return per_round * i


def training_row(i: int, algorithm: str) -> dict:
    row = {
        "iteration": i,
        "rollouts": rollouts(i, algorithm),
        "reward_mean": 0.1 * i,
        "accuracy": 0.05 * i,
        "entropy": 2.0 - 0.1 * i,
        "response_length": 100.0 + i,
        "time_rollout": 1.0,
        "time_update": 2.0,
        "seconds": 3.5,
    }
    if algorithm == "sfpo":
        row.update(sfpo_active=float(i <= SWITCH), switched=float(i >= SWITCH), alpha=0.8)
        row["entropy"] += 0.5
    return row


def eval_row(i: int, score: float) -> dict:
    return {"iteration": i, "eval/gsm8k": score, "eval/math": score / 2, "eval/macro": score * 0.75}


@pytest.fixture
def two_runs(tmp_path):
    sfpo, grpo = tmp_path / "sfpo_run", tmp_path / "grpo_run"
    for directory, algorithm in ((sfpo, "sfpo"), (grpo, "grpo")):
        rows = [training_row(i, algorithm) for i in range(1, ITERATIONS + 1)]
        write_run(directory, algorithm, rows + [eval_row(5, 0.4), eval_row(10, 0.6)])
    return sfpo, grpo


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_entropy_figure_marks_the_sfpo_switch(two_runs):
    runs = [load_run(d) for d in two_runs]
    assert [run.label for run in runs] == ["sfpo_run (sfpo)", "grpo_run (grpo)"]
    figures = build_figures(runs)
    assert sorted(figures) == ["entropy", "eval", "response_length", "reward", "time"]
    (ax,) = figures["entropy"].axes
    lines = lines_by_label(ax)
    assert set(lines) == {"sfpo_run (sfpo)", "grpo_run (grpo)", "sfpo_run (sfpo): switch @ 7"}
    switch = lines["sfpo_run (sfpo): switch @ 7"]
    assert list(switch.get_xdata()) == [SWITCH, SWITCH] and switch.get_linestyle() == "--"
    assert switch.get_color() == lines["sfpo_run (sfpo)"].get_color()
    assert list(lines["grpo_run (grpo)"].get_ydata()) == pytest.approx(
        [2.0 - 0.1 * i for i in range(1, ITERATIONS + 1)]
    )
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "sfpo_run (sfpo): switch @ 7" in legend


def test_runs_are_overlaid_with_one_labelled_line_each(two_runs):
    figures = build_figures([load_run(d) for d in two_runs])
    reward, accuracy = figures["reward"].axes
    assert reward.get_title() == "reward_mean" and accuracy.get_title() == "accuracy"
    lines = lines_by_label(reward)
    assert sorted(lines) == ["grpo_run (grpo)", "sfpo_run (sfpo)"]
    assert lines["sfpo_run (sfpo)"].get_color() != lines["grpo_run (grpo)"].get_color()
    sfpo = lines["sfpo_run (sfpo)"]  # eval rows carry no reward: only the 12 training points
    assert list(sfpo.get_xdata()) == list(range(1, ITERATIONS + 1))
    assert list(sfpo.get_ydata()) == pytest.approx([0.1 * i for i in range(1, ITERATIONS + 1)])
    panels = figures["eval"].axes
    assert [ax.get_title() for ax in panels] == ["eval/macro", "eval/gsm8k", "eval/math"]
    macro = lines_by_label(panels[0])["grpo_run (grpo)"]
    assert list(macro.get_xdata()) == [5, 10] and macro.get_marker() == "o"
    assert list(macro.get_ydata()) == pytest.approx([0.3, 0.45])
    # time: one panel per run, phases stacked, whole iteration as a line
    assert [ax.get_title() for ax in figures["time"].axes] == ["sfpo_run (sfpo)", "grpo_run (grpo)"]
    time_panel = figures["time"].axes[0]
    legend = {text.get_text() for text in time_panel.get_legend().get_texts()}
    assert legend == {"rollout", "update", "whole iteration"}
    whole = lines_by_label(time_panel)["whole iteration"]
    assert list(whole.get_ydata()) == [3.5] * ITERATIONS


def test_against_rollouts_every_curve_is_placed_by_its_iterations_count(two_runs):
    sfpo, grpo = (load_run(d, "rollouts") for d in two_runs)
    figures = build_figures([sfpo, grpo])
    reward = figures["reward"].axes[0]
    assert reward.get_xlabel() == "rollouts"
    lines = lines_by_label(reward)
    for label, algorithm in (("sfpo_run (sfpo)", "sfpo"), ("grpo_run (grpo)", "grpo")):
        expected = [rollouts(i, algorithm) for i in range(1, ITERATIONS + 1)]
        assert list(lines[label].get_xdata()) == expected
        assert list(lines[label].get_ydata()) == pytest.approx([0.1 * i for i in range(1, 13)])
    # evaluations are logged apart from their iteration's training row, without the count
    macro = lines_by_label(figures["eval"].axes[0])["sfpo_run (sfpo)"]
    assert list(macro.get_xdata()) == [rollouts(5, "sfpo"), rollouts(10, "sfpo")]
    entropy_lines = lines_by_label(figures["entropy"].axes[0])
    at = rollouts(SWITCH, "sfpo")
    assert list(entropy_lines[f"sfpo_run (sfpo): switch @ {at}"].get_xdata()) == [at, at]
    whole = lines_by_label(figures["time"].axes[0])["whole iteration"]
    assert list(whole.get_xdata()) == [rollouts(i, "sfpo") for i in range(1, ITERATIONS + 1)]
    assert figures["time"].axes[0].get_xlabel() == "rollouts"


def test_cli_plots_against_rollouts_and_refuses_runs_without_them(two_runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli.main(["plot", *map(str, two_runs), "--out", str(out), "--x", "rollouts"]) == 0
    assert (out / "reward.png").is_file()
    old = tmp_path / "old_run"
    write_run(old, "grpo", [{"iteration": 1, "reward_mean": 0.5}])
    capsys.readouterr()
    assert cli.main(["plot", str(old), "--x", "rollouts"]) == 2
    assert "no 'rollouts' logged" in capsys.readouterr().err
    assert cli.main(["plot", str(old)]) == 0  # against iterations it still plots


def test_switch_falls_back_to_sfpo_active(tmp_path):
    rows = [{"iteration": i, "sfpo_active": float(i <= 4)} for i in range(1, 9)]
    assert Run("x", rows).switch_iteration() == 4
    always = [{"iteration": i, "sfpo_active": 1.0} for i in range(1, 9)]
    assert Run("x", always).switch_iteration() is None


def test_cli_writes_decodable_pngs(two_runs, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "plots"
    assert cli.main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    names = ["reward", "eval", "entropy", "response_length", "time"]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {out / name}.png" for name in names]
    for name in names:
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500
        assert image.std() > 0.01  # something was drawn


def test_plots_without_data_are_skipped_and_default_out_is_first_run(tmp_path, capsys):
    run = tmp_path / "grpo"
    write_run(run, "grpo", [training_row(i, "grpo") | {"response_length": None} for i in (1, 2)])
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipped eval.png: no run logged eval/*" in out
    assert "skipped response_length.png: no run logged response_length" in out
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "entropy.png",
        "reward.png",
        "time.png",
    ]


def test_missing_run_dir_is_exit_2(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "nope: no metrics.jsonl" in capsys.readouterr().err


def test_malformed_line_is_exit_2_naming_file_and_line(two_runs, capsys):
    path = two_runs[1] / "metrics.jsonl"
    path.write_text(path.read_text() + "{oops\n" + json.dumps({"iteration": 99}) + "\n")
    assert cli.main(["plot", *map(str, two_runs)]) == 2
    assert f"{path}:15: malformed JSON" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(two_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotError, match=r"pip install sfpo-megatron\[plot\]"):
        build_figures([load_run(two_runs[0])])
