"""``sfpo-megatron plot``: PNG curves from the metrics.jsonl of one or more runs, overlaid so a
GRPO and a SFPO run can be compared, against the iteration or the cumulative ``rollouts``
(training samples generated: SFPO's claim is about rollouts). matplotlib is imported only
here, and only when drawing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfpo_megatron.training.metrics import (
    CONFIG_FILE,
    EVAL_PREFIX,
    METRICS_FILE,
    PHASES,
    MetricsFileError,
    is_number,
    read_metrics,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class PlotError(ValueError):
    """A run directory cannot be plotted (no metrics, bad lines) or matplotlib is missing."""


@dataclass
class Run:
    """One run's records, under the label its curves get in legends, drawn against ``x``:
    ``iteration``, or a cumulative metric logged once per iteration (``rollouts``), which
    then places every record of that iteration (evaluations logged apart included)."""

    label: str
    records: list[dict[str, Any]]
    x: str = "iteration"

    def __post_init__(self) -> None:
        self._x_of = {
            r["iteration"]: r["iteration"] if self.x == "iteration" else r[self.x]
            for r in self.records
            if self.x == "iteration" or is_number(r.get(self.x))
        }

    def has(self, key: str) -> bool:
        return any(is_number(record.get(key)) for record in self.records)

    def position(self, iteration: int) -> float | None:
        """Where ``iteration`` lies on the x axis (None: its ``x`` was not logged)."""
        return self._x_of.get(iteration)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(x positions, values) of the records that carry ``key``."""
        points = [
            (self.position(r["iteration"]), r[key])
            for r in self.records
            if is_number(r.get(key)) and self.position(r["iteration"]) is not None
        ]
        return [x for x, _ in points], [y for _, y in points]

    def switch_iteration(self) -> int | None:
        """The iteration whose entropy z-score ended SFPO: the first with ``switched`` set, or
        where ``switched`` was not logged, the last with ``sfpo_active`` 1 before it turns 0."""
        switched = [r["iteration"] for r in self.records if _flag(r, "switched")]
        if switched:
            return switched[0]
        last_active = None
        for r in self.records:
            if not is_number(r.get("sfpo_active")):
                continue
            if r["sfpo_active"]:
                last_active = r["iteration"]
            elif last_active is not None:
                return last_active
        return None


def _flag(record: dict[str, Any], key: str) -> bool:
    return is_number(record.get(key)) and bool(record[key])


def load_run(run_dir: str | Path, x: str = "iteration") -> Run:
    """Read ``run_dir/metrics.jsonl``; the label is the directory name plus the algorithm that
    ``config.json`` names. Against ``x`` other than ``iteration``, the run must have logged
    it."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (is this a run's logging.output_dir?)")
    try:
        records = read_metrics(path)
    except MetricsFileError as error:
        raise PlotError(str(error)) from None
    label = run_dir.resolve().name
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            algorithm = json.loads(config_path.read_text()).get("algorithm", {}).get("name")
        except (json.JSONDecodeError, AttributeError):
            raise PlotError(f"{config_path}: not a JSON run config") from None
        if algorithm:
            label = f"{label} ({algorithm})"
    run = Run(label, records, x)
    if x != "iteration" and not run.has(x):
        raise PlotError(
            f"{path}: no {x!r} logged (a run older than that metric?): use --x iteration"
        )
    return run


def _colored(runs: list[Run]) -> Iterator[tuple[Run, str]]:
    """One colour per run, the same in every figure."""
    for index, run in enumerate(runs):
        yield run, f"C{index % 10}"


def _new_figure(panels: int, title: str, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """A grid of ``panels`` axes (3 a row) on a figure of its own: no pyplot state is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install sfpo-megatron[plot]") from None
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(5.5 * cols, 4 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg, whatever pyplot's backend is
    axes = figure.subplots(rows, cols, sharey=sharey, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:panels]


def _curves(
    runs: list[Run], keys: list[str], title: str, marker: str | None = None
) -> Figure | None:
    """One panel per key some run has, one line per run; None when no run has any key."""
    keys = [key for key in keys if any(run.has(key) for run in runs)]
    if not keys:
        return None
    figure, axes = _new_figure(len(keys), title)
    for ax, key in zip(axes, keys, strict=True):
        for run, color in _colored(runs):
            if run.has(key):
                ax.plot(*run.series(key), color=color, marker=marker, label=run.label)
        ax.set(title=key, xlabel=runs[0].x)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def _reward(runs: list[Run]) -> Figure | None:
    return _curves(runs, ["reward_mean", "accuracy"], "training reward")


def _eval(runs: list[Run]) -> Figure | None:
    macro = EVAL_PREFIX + "macro"
    sources = sorted(
        {k for run in runs for r in run.records for k in r if k.startswith(EVAL_PREFIX)}
    )
    keys = [macro] + [key for key in sources if key != macro]
    return _curves(runs, keys, "evaluation (avg@k accuracy)", marker="o")


def _entropy(runs: list[Run]) -> Figure | None:
    figure = _curves(runs, ["entropy"], "policy entropy")
    if figure is None:
        return None
    ax = figure.axes[0]
    for run, color in _colored(runs):
        switch = run.switch_iteration()
        at = None if switch is None else run.position(switch)
        if at is not None:
            ax.axvline(at, color=color, linestyle="--", label=f"{run.label}: switch @ {at:.0f}")
    ax.legend()
    return figure


def _response_length(runs: list[Run]) -> Figure | None:
    return _curves(runs, ["response_length"], "mean response length (tokens)")


def _time(runs: list[Run]) -> Figure | None:
    """Per run, the phases of each iteration stacked, and the whole iteration as a line."""
    timed = [run for run in runs if any(run.has(key) for key in [*PHASES, "seconds"])]
    if not timed:
        return None
    figure, axes = _new_figure(len(timed), "seconds per iteration by phase", sharey=True)
    for ax, run in zip(axes, timed, strict=True):
        per_iteration: dict[int, dict[str, float]] = {}
        for record in run.records:
            row = per_iteration.setdefault(record["iteration"], {})
            for key in PHASES:
                if is_number(record.get(key)):
                    row[key] = row.get(key, 0.0) + record[key]
        iterations = [
            i for i, row in sorted(per_iteration.items()) if row and run.position(i) is not None
        ]
        xs = [run.position(i) for i in iterations]
        phases = [key for key in PHASES if run.has(key)]
        if phases:
            stacks = [[per_iteration[i].get(key, 0.0) for i in iterations] for key in phases]
            labels = [PHASES[key] for key in phases]
            ax.stackplot(xs, *stacks, labels=labels, step="mid", alpha=0.8)
        if run.has("seconds"):
            ax.plot(*run.series("seconds"), "k-", drawstyle="steps-mid", label="whole iteration")
        ax.set(title=run.label, xlabel=run.x, ylabel="seconds")
        ax.legend(loc="upper left", fontsize="small")
    return figure


# Output name -> (builder, what a run must have logged for it).
PLOTS: dict[str, tuple[Callable[[list[Run]], Figure | None], str]] = {
    "reward": (_reward, "reward_mean or accuracy"),
    "eval": (_eval, f"{EVAL_PREFIX}*"),
    "entropy": (_entropy, "entropy"),
    "response_length": (_response_length, "response_length"),
    "time": (_time, "time_* or seconds"),
}


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    """The figures (by output name) for which at least one run has the metrics."""
    figures = {}
    for name, (builder, _) in PLOTS.items():
        figure = builder(runs)
        if figure is not None:
            figures[name] = figure
    return figures


def save_figures(figures: dict[str, Figure], out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/<name>.png`` for each figure; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def plot_runs(
    run_dirs: list[str | Path], out_dir: str | Path | None = None, x: str = "iteration"
) -> list[Path]:
    """The ``plot`` command: load, draw against ``x``, save (default ``FIRST_RUN_DIR/plots``),
    report."""
    runs = [load_run(run_dir, x) for run_dir in run_dirs]
    figures = build_figures(runs)
    for name, (_, needs) in PLOTS.items():
        if name not in figures:
            print(f"skipped {name}.png: no run logged {needs}")
    paths = save_figures(figures, out_dir if out_dir is not None else Path(run_dirs[0]) / "plots")
    for path in paths:
        print(f"wrote {path}")
    return paths
