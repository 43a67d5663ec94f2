"""What every task pool shares: its tasks and device (`EvaluatorBase`), and what its `evaluate` does around its own
per-task scoring: the model on the device in eval mode, each task timed, a callback after each task, the model's
training flag restored."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

TaskDoneCallback = Callable[[str, dict[str, float], dict[str, dict[str, float]]], None]
BOOKKEEPING = ("samples", "seconds")          # what the callback sees of a task besides its metrics


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EvaluatorBase:
    """A task pool's tasks (each with a `name`) and the device it evaluates on (None: `default_device()`); a trial
    sets `device` to the one it was given."""

    tasks: Sequence[Any]
    device: torch.device | None = None

    @property
    def task_names(self) -> list[str]:
        """Task names, in evaluation order."""
        return [task.name for task in self.tasks]

    def resolved_device(self) -> torch.device:
        return self.device if self.device is not None else default_device()


def evaluate_each(model: nn.Module, tasks: Sequence[Any], evaluate_task: Callable[..., dict[str, float]],
                  *, device: torch.device, on_task_done: TaskDoneCallback | None = None,
                  rows: slice | None = None) -> dict[str, dict[str, float]]:
    """{task name: its metrics} from `evaluate_task(model, task)` (which returns them with "samples"); after each task
    on_task_done(name, its metrics with "samples" and "seconds", the results so far). With `rows`,
    `evaluate_task(model, task, rows)` scores that slice of the task's samples; a task with none there is left out."""
    model.to(device)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for task in tasks:
            start = time.perf_counter()
            metrics = evaluate_task(model, task) if rows is None else evaluate_task(model, task, rows)
            if not metrics["samples"]:
                continue
            metrics["seconds"] = time.perf_counter() - start
            results[task.name] = {key: value for key, value in metrics.items() if key not in BOOKKEEPING}
            if on_task_done is not None:
                on_task_done(task.name, metrics, dict(results))
    finally:
        model.train(was_training)
    return results


def merge_sample_means(total: dict[str, float] | None, part: dict[str, float]) -> dict[str, float]:
    """Two evaluations of disjoint samples of one task as one: every metric (a mean over samples) weighted by its
    "samples", which add up."""
    if total is None:
        return dict(part)
    samples = total["samples"] + part["samples"]
    merged = {key: (total[key] * total["samples"] + part[key] * part["samples"]) / samples
              for key in part if key not in BOOKKEEPING}
    return {**merged, "samples": samples, "seconds": total.get("seconds", 0.0) + part.get("seconds", 0.0)}
