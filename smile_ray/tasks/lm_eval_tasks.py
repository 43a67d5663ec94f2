"""lm-eval tasks by name: lm-eval's TaskManager (the tasks it ships, and the YAMLs of an include_path), and the
checks a `task_pool: {kind: lm_eval}` makes before anything loads. Imports lm-eval, not torch."""
from __future__ import annotations

import difflib
import os
from functools import lru_cache

from smile_ray.errors import SmileError
from smile_ray.kinds.lm_eval import LmEvalConfig, metric_key

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")   # dataset_path values that read data_files


@lru_cache(maxsize=4)
def task_manager(include_path: str | None, names: tuple[str, ...]):
    """A TaskManager that knows `names`: the include_path's YAMLs alone when they hold every name (indexing lm-eval's
    14,000 shipped tasks takes 10–20 s), else those and lm-eval's own."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in manager.all_tasks for name in names):
            return manager
    return TaskManager(include_path=include_path)


def manager_for(config: LmEvalConfig):
    return task_manager(config.include_path, tuple(entry["name"] for entry in config.tasks))


def check_tasks(config: LmEvalConfig) -> None:
    """Each task exists (else the close names), declares its metric and filter, and its dataset is a local file
    builder, a local directory, or a hub dataset that can be fetched or is cached."""
    from smile_ray.hub import check_source

    manager = manager_for(config)
    for i, entry in enumerate(config.tasks):
        where, name = f"task_pool.tasks[{i}]", entry["name"]
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SmileError(f"{where}: lm-eval has no task {name!r}{hint}"
                             + ("" if config.include_path else " (a task of your own: set task_pool.include_path)"))
        task = manager.task_index[name].cfg or {}
        if "metric_list" in task:            # a task (a group aggregates its tasks' metrics)
            metrics = [m["metric"] for m in task["metric_list"] if isinstance(m, dict) and "metric" in m]
            filters = [f["name"] for f in task.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
            metric, filter_name = metric_key(entry["metric"])
            if metric not in metrics:
                raise SmileError(f"{where}.metric: task {name} reports {', '.join(metrics)}, not {metric!r}")
            if filter_name not in filters:
                raise SmileError(f"{where}.metric: task {name} filters its outputs by {', '.join(filters)}, "
                                 f"not {filter_name!r}")
        dataset = task.get("dataset_path")
        if isinstance(dataset, str) and dataset not in LOCAL_BUILDERS and not os.path.isdir(dataset):
            check_source(dataset, field=f"{where} ({name}): dataset", repo_type="dataset")
