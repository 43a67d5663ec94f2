"""The FusionBench-compatible report of one evaluated model (smile-facts §4.1), and its text/flat views.

    {"model_info": {"trainable_params", "all_params", "trainable_percentage", "name", ...},
     "<task>": {"accuracy": float in [0, 1], "loss": float}, ...,
     "average": {"accuracy", "loss", "score"},    # score: the mean of each task's primary metric
     "timings": {"svd_seconds", "upscale_seconds", "eval_seconds", ...}}

Pure Python: no Ray, no MLflow, no torch import (models are only asked for `named_parameters()`).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

RESERVED_KEYS = ("model_info", "average", "timings", "routing", "saved_model")
# the numbers run_trial reports besides the tasks' METRICS (tests/test_run.py checks a real report against these)
MODEL_INFO_NUMBERS = ("trainable_params", "all_params", "trainable_percentage", "active_params", "base_params",
                      "extra_params", "ratio", "svd_calls", "svd_cache_hits")
TIMINGS = ("load_seconds", "svd_seconds", "upscale_seconds", "eval_seconds", "eval_samples")


def count_parameters(model: Any) -> dict[str, int | float]:
    """FusionBench's parameter accounting: shared parameters counted once (as `named_parameters` yields them);
    `trainable_percentage` is a fraction in [0, 1], as FusionBench writes it."""
    all_params = trainable = 0
    for _, param in model.named_parameters():
        all_params += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable_params": trainable, "all_params": all_params,
            "trainable_percentage": trainable / all_params if all_params else 0.0}


def task_names(report: Mapping[str, Any]) -> list[str]:
    """Task keys of a report or a results dict, in order (everything but model_info, average, timings)."""
    return [key for key, value in report.items() if key not in RESERVED_KEYS and isinstance(value, Mapping)]


def average_metrics(results: Mapping[str, Mapping[str, float]],
                    primary: Mapping[str, str] | None = None) -> dict[str, float]:
    """Unweighted mean over tasks of every metric that every task has, and with `primary` (task → the metric that is
    its score) the mean of the tasks' scores as "score"."""
    tasks = task_names(results)
    if not tasks:
        return {}
    shared = [metric for metric in results[tasks[0]] if all(metric in results[task] for task in tasks)]
    average = {metric: sum(float(results[task][metric]) for task in tasks) / len(tasks) for metric in shared}
    if primary is not None:
        average["score"] = sum(float(results[task][primary[task]]) for task in tasks) / len(tasks)
    return average


def build_report(results: Mapping[str, Mapping[str, float]], *, model: Any = None, name: str | None = None,
                 model_info: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None,
                 primary: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The report of one model from per-task `results` (as a task pool's `evaluate` returns them).

    `model_info` starts from `count_parameters(model)` when `model` is given; `model_info` adds or overrides
    entries (extra parameter accounting, e.g. base/expert parameter counts). "average" is computed from the tasks
    (with `primary`, task → its score's metric, it holds "score", the mean of the tasks' scores), else taken from
    `results`. `timings` holds seconds, e.g. {"svd_seconds", "upscale_seconds", "eval_seconds"}, and "eval_samples".
    """
    info: dict[str, Any] = count_parameters(model) if model is not None else {}
    info.update(model_info or {})
    if name is not None:
        info["name"] = name
    missing = [key for key in ("trainable_params", "all_params", "trainable_percentage") if key not in info]
    if missing:
        raise ValueError(f"model_info lacks {', '.join(missing)}: pass model= or give them in model_info")
    report: dict[str, Any] = {"model_info": info}
    for task in task_names(results):
        report[task] = {metric: float(value) for metric, value in results[task].items()}
    if not task_names(report) and primary is None:
        raise ValueError("results hold no task")      # (a task pool that declares no tasks, `dummy`, passes {})
    average = average_metrics(report, primary) if primary is not None else (results.get("average")
                                                                             or average_metrics(report))
    report["average"] = {metric: float(value) for metric, value in average.items()}
    report["timings"] = {key: float(value) for key, value in (timings or {}).items()}
    return report


def format_task_table(report: Mapping[str, Any]) -> str:
    """Per-task text table, a column per metric the tasks report (fractions in %, losses as they are); then the
    average row."""
    rows = [(task, report[task]) for task in task_names(report)]
    average = [("average", report["average"])] if "average" in report else []
    metrics = list(dict.fromkeys(metric for _, values in [*rows, *average] for metric in values))
    width = max(len(task) for task, _ in [("task", {}), *rows, *average])
    percent = {metric: "loss" not in metric for metric in metrics}
    titles = {metric: f"{metric} %" if percent[metric] else metric for metric in metrics}
    header = f"{'task':<{width}}" + "".join(f"  {titles[metric]:>{max(8, len(titles[metric]))}}" for metric in metrics)
    rule = "-" * len(header)

    def cell(metric: str, value: Any) -> str:
        text = _number(value, 100.0 if percent[metric] else 1.0, 2 if percent[metric] else 4)
        return f"  {text:>{max(8, len(titles[metric]))}}"

    def line(task: str, values: Mapping[str, Any]) -> str:
        return f"{task:<{width}}" + "".join(cell(metric, values.get(metric)) for metric in metrics)

    lines = [header, rule, *(line(task, values) for task, values in rows)]
    if average:
        lines += [rule, line(*average[0])]
    return "\n".join(lines)


def _number(value: Any, scale: float, digits: int) -> str:
    return "-" if value is None else f"{float(value) * scale:.{digits}f}"


def flatten_metrics(report: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numeric entries under "/"-joined names: "<task>/accuracy", "average/loss", "model_info/all_params",
    "timings/svd_seconds", ... (strings such as model_info/name, and booleans, are left out)."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, numbers.Integral):
            flat[name] = int(value)                       # counts stay counts (Tune's table: 1741824, not 1.74e+06)
        elif isinstance(value, numbers.Real):
            flat[name] = float(value)
    return flat
