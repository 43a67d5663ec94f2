"""Figures of a finished sweep, from plain lists and dicts (no Ray, no MLflow).

A sweep point is a dict describing one finished trial:

    {"trial_id": "a1b2c_00003",
     "config":  {"method.name": "smile", "method.gate_k": 4, "method.k": 8, ...},   # flat, dotted keys
     "metrics": {"average/accuracy": 0.91, "model_info/all_params": 1.2e6, ...},     # flat, "/" keys
     "report":  {...} or None}                                                         # FusionBench report

Figures are built with `matplotlib.figure.Figure` directly, so no pyplot state and no GUI backend is involved
(saving a PNG uses Agg).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from smile_ray.report import task_names

DENSE = "dense"
DPI = 120                      # 6 × 4.5 in → 720 × 540 px, legible in the MLflow UI's artifact view
Cell = tuple[int, int | str]


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def k_label(k: int) -> int | str:
    """Column label of an expert rank: negative k means dense experts."""
    return DENSE if k < 0 else k


def heatmap_cells(entries: Iterable[tuple[int, int, float]], mode: str = "max"
                  ) -> tuple[list[int], list[int | str], list[list[float | None]]]:
    """(gate_k, k, value) triples to a grid: rows gate_k ascending, columns k ascending then "dense" (k < 0).

    A cell shared by several entries (e.g. different top_k) holds the best value under `mode`; empty cells are None.
    """
    best: dict[Cell, float] = {}
    for gate_k, k, value in entries:
        cell = (int(gate_k), k_label(int(k)))
        if _finite(value) and (cell not in best or _better(value, best[cell], mode)):
            best[cell] = float(value)
    rows = sorted({gate_k for gate_k, _ in best})
    cols = sorted({k for _, k in best}, key=lambda k: (k == DENSE, k if k != DENSE else 0))
    values = [[best.get((gate_k, k)) for k in cols] for gate_k in rows]
    return rows, cols, values


def plot_heatmap(rows: Sequence[int], cols: Sequence[int | str], values: Sequence[Sequence[float | None]], *,
                 metric: str = "average/accuracy", percent: bool = True, row_label: str = "gate_k (router rank)",
                 col_label: str = "k (expert rank)") -> Figure:
    """The paper's gate_k × k figure: one annotated cell per configuration, blank where none ran."""
    grid = [[math.nan if v is None else v * (100.0 if percent else 1.0) for v in row] for row in values]
    fig = Figure(figsize=(max(6.0, 2.0 + 0.8 * len(cols)), max(4.5, 1.5 + 0.45 * len(rows))), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(f"{metric}{' (%)' if percent else ''}, best per cell")
    finite = [v for row in grid for v in row if math.isfinite(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.1f}" if percent else f"{value:.3g}", ha="center", va="center",
                        fontsize=10, color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax)
    return fig


def pareto_front(costs: Sequence[float], scores: Sequence[float], mode: str = "max") -> list[int]:
    """Indices of the points no other point beats: lower cost and a score at least as good (`mode`), by cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i] if mode == "max" else scores[i]))
    front: list[int] = []
    for i in order:
        if not front or _better(scores[i], scores[front[-1]], mode):
            front.append(i)
    return front


def plot_pareto(params: Sequence[float], scores: Sequence[float], labels: Sequence[str], *,
                metric: str = "average/accuracy", mode: str = "max", percent: bool = True) -> Figure:
    """Score against total parameter count, one colour per label (method), the Pareto front highlighted; scores in
    % when `percent` (as the heatmap shows them)."""
    scores = [value * (100.0 if percent else 1.0) for value in scores]
    fig = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for label in dict.fromkeys(labels):
        idx = [i for i, name in enumerate(labels) if name == label]
        ax.scatter([params[i] for i in idx], [scores[i] for i in idx], label=label, alpha=0.7, s=24)
    front = pareto_front(params, scores, mode)
    ax.plot([params[i] for i in front], [scores[i] for i in front], color="crimson", drawstyle="steps-post",
            marker="o", markerfacecolor="none", markersize=10, linewidth=1.2, label="Pareto front")
    if params and max(params) > 10 * max(min(params), 1):
        ax.set_xscale("log")
    ax.set_xlabel("model_info/all_params")
    ax.set_ylabel(f"{metric}{' (%)' if percent else ''}")
    ax.set_title(f"{metric} vs parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_task_bars(tasks: Sequence[str], series: Mapping[str, Mapping[str, float]], *,
                   metric: str = "accuracy", percent: bool = True) -> Figure:
    """Grouped bars: per task, one bar per series (e.g. the best trial, each fine-tuned model on its own task);
    values in % when `percent`."""
    fig = Figure(figsize=(max(6.0, 1.5 + 0.9 * len(tasks)), 5.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    scale = 100.0 if percent else 1.0
    for s, (name, values) in enumerate(series.items()):
        xs = [t + (s - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [values.get(task, math.nan) * scale for task in tasks], width=width, label=name)
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=30, ha="right")
    ax.set_ylabel(f"{metric}{' (%)' if percent else ''}")
    ax.set_title(f"per-task {metric}")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=1, fontsize=8)
    return fig


def plot_routing(routing: Mapping[str, Any]) -> Figure:
    """Where each task's tokens went (a report's "routing"): the share routed to each expert, averaged over the
    upscaled layers (tasks × experts), and per layer the share routed to the task's own expert."""
    experts, tasks = list(routing["experts"]), routing["tasks"]
    names = list(tasks)
    layers = list(next(iter(tasks.values())))
    fig = Figure(figsize=(max(10.0, 4.0 + 0.6 * len(experts) + 0.12 * len(layers)), max(4.5, 1.5 + 0.4 * len(names))),
                 dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[max(len(experts), 3), max(len(layers) // 4, 4)])
    grid = [[100 * sum(tasks[t][layer][e] for layer in layers) / len(layers) for e in range(len(experts))]
            for t in names]
    image = left.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    left.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    left.set_yticks(range(len(names)), names)
    left.set_xlabel("expert")
    left.set_ylabel("task")
    left.set_title("tokens routed to each expert (%), mean over layers")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            left.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 50 else "white")
    fig.colorbar(image, ax=left)
    for task in names:
        if task in experts:
            own = experts.index(task)
            right.plot(range(len(layers)), [100 * tasks[task][layer][own] for layer in layers], label=task,
                       marker=".", linewidth=1)
    right.set_ylim(0, 100)
    right.set_xlabel("upscaled layer (model order)")
    right.set_ylabel("tokens routed to the task's own expert (%)")
    right.set_title("per layer")
    right.grid(True, alpha=0.3)
    if right.lines:
        right.legend(fontsize=7, ncols=2)
    return fig


def best_point(points: Sequence[Mapping[str, Any]], metric: str, mode: str = "max") -> Mapping[str, Any] | None:
    """The point with the best finite `metric`; points that carry a full report win over those that do not
    (a trial stopped early reports a running average over fewer tasks).

    Ties (values equal up to TIE_REL_TOL, so that averages summed in another order still tie) go to the point with
    the fewest `model_info/extra_params` (a point without a finite count loses to any that has one), then to the
    smallest trial_id: the choice does not depend on the order of `points`, so a restored sweep picks the same one.
    The one rule for summary.json's and MLflow's best trial.
    """
    scored = [p for p in points if _finite(p["metrics"].get(metric))]
    candidates = [p for p in scored if p.get("report")] or scored
    if not candidates:
        return None
    values = [p["metrics"][metric] for p in candidates]
    top = max(values) if mode == "max" else min(values)
    tied = [p for p in candidates if math.isclose(p["metrics"][metric], top, rel_tol=TIE_REL_TOL, abs_tol=0.0)]
    return min(tied, key=_tie_key)


TIE_REL_TOL = 1e-9


def _tie_key(point: Mapping[str, Any]) -> tuple[bool, float, str]:
    extra = point["metrics"].get("model_info/extra_params")
    return (not _finite(extra), extra if _finite(extra) else 0.0, str(point.get("trial_id", "")))


def _task_accuracies(point: Mapping[str, Any], metric: str,
                     primary: Mapping[str, str] | None = None) -> dict[str, float]:
    """task → the point's `metric` on it ("score": the task's primary metric, `primary` naming it)."""
    report = point.get("report")
    if report:
        name = (lambda task: primary.get(task, metric)) if metric == "score" and primary else (lambda task: metric)
        return {task: float(report[task][name(task)]) for task in task_names(report)
                if _finite(report[task].get(name(task)))}
    suffix = f"/{metric}"
    return {key[:-len(suffix)]: value for key, value in point["metrics"].items()
            if key.endswith(suffix) and "/" not in key[:-len(suffix)] and key[:-len(suffix)] != "average"}


def _describe(point: Mapping[str, Any]) -> str:
    """What the point's configuration is, in the words of its MLflow run name ("smile gk32 k32")."""
    from smile_ray.methods import describe

    method = {key[len("method."):]: value for key, value in point["config"].items() if key.startswith("method.")}
    return describe(method) or str(point.get("trial_id", "trial"))


def task_series(points: Sequence[Mapping[str, Any]], best: Mapping[str, Any], metric: str = "accuracy",
                primary: Mapping[str, str] | None = None
                ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Per-task series for `plot_task_bars`: the best trial, each individual fine-tuned model on its own task
    (`method.name == "individual"`, `method.model == <task>`), and the pretrained model when it ran.

    Returns ([], {}) when no individual model matches a task of the best trial.
    """
    best_values = _task_accuracies(best, metric, primary)
    own: dict[str, float] = {}
    pretrained: dict[str, float] = {}
    for point in points:
        config = point["config"]
        if config.get("method.name") != "individual":
            continue
        values = _task_accuracies(point, metric, primary)
        model = config.get("method.model", "pretrained")
        if model == "pretrained":
            pretrained = values
        elif model in best_values and model in values:
            own[model] = values[model]
    if not own:
        return [], {}
    series = {f"best: {_describe(best)}": best_values, "individual (own task)": own}
    if pretrained:
        series["pretrained"] = pretrained
    return list(best_values), series


def sweep_figures(points: Sequence[Mapping[str, Any]], metric: str = "average/accuracy", mode: str = "max",
                  primary: Mapping[str, str] | None = None) -> dict[str, Figure]:
    """The figures the sweep has data for, keyed by artifact path: heatmap (SMILE trials with gate_k and k),
    Pareto scatter (points with `model_info/all_params`), per-task bars (needs individual-model trials)."""
    from smile_ray.methods import METHODS

    figures: dict[str, Figure] = {}
    percent = metric.endswith(("accuracy", "score"))
    gridded = {name: method for name, method in METHODS.items() if method.grid_axes
               and any(p["config"].get("method.name") == name for p in points)}
    for name, method in gridded.items():             # the paper's gate_k × k figure, for SMILE
        rows_axis, cols_axis = method.grid_axes
        cells = [(p["config"][f"method.{rows_axis}"], p["config"][f"method.{cols_axis}"], p["metrics"][metric])
                 for p in points if p["config"].get("method.name") == name and _finite(p["metrics"].get(metric))
                 and isinstance(p["config"].get(f"method.{rows_axis}"), int)
                 and isinstance(p["config"].get(f"method.{cols_axis}"), int)]
        rows, cols, values = heatmap_cells(cells, mode)
        if rows:
            labels = {axis: f"{axis} ({next(p.help for p in method.params if p.name == axis).split(';')[0]})"
                      for axis in method.grid_axes}
            figures["plots/heatmap.png" if len(gridded) == 1 else f"plots/heatmap_{name}.png"] = plot_heatmap(
                rows, cols, values, metric=metric, percent=percent, row_label=labels[rows_axis],
                col_label=labels[cols_axis])
    sized = [p for p in points if _finite(p["metrics"].get(metric)) and _finite(p["metrics"].get("model_info/all_params"))]
    if sized:
        figures["plots/pareto.png"] = plot_pareto(
            [p["metrics"]["model_info/all_params"] for p in sized], [p["metrics"][metric] for p in sized],
            [str(p["config"].get("method.name", "trial")) for p in sized], metric=metric, mode=mode, percent=percent)
    best = best_point(points, metric, mode)
    if best is not None:
        tasks, series = task_series(points, best, metric.rsplit("/", 1)[-1], primary)
        if tasks:
            figures["plots/per_task.png"] = plot_task_bars(tasks, series, metric=metric.rsplit("/", 1)[-1],
                                                           percent=percent)
    return figures
