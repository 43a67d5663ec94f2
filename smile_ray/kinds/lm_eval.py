"""`task_pool: {kind: lm_eval}`: tasks of EleutherAI's lm-evaluation-harness, evaluated in-process on the merged
causal LM (lm-eval's HFLM around the model object: no save and reload per trial), one report entry per task with
the metric named for it and lm-eval's standard error, reported after each task.

    task_pool:
      kind: lm_eval
      tasks:
        - {name: gsm8k, metric: "exact_match,flexible-extract"}     # lm-eval's "<metric>,<filter>"
        - {name: arc_challenge, metric: acc_norm}                   # filter "none"
        - truthfulqa_mc2                                            # metric: acc
      num_fewshot: 5          # default: each task's own
      limit: 200              # examples per task (a fraction if < 1); default: all
      batch_size: 8
      include_path: tasks/    # directory of task YAMLs (absolute data_files paths: lm-eval resolves them against
                              # the working directory, not the YAML's)

Report and MLflow names: "exact_match,flexible-extract" becomes `exact_match.flexible-extract` (MLflow refuses
commas) and its error `exact_match_stderr.flexible-extract`; a metric of filter "none" keeps its bare name.
Task names, metrics and the datasets they need are checked before anything loads (`check`): an unknown task gets
the close names, a task whose dataset is on an unreachable hub is refused in one line.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from smile_ray.errors import SmileError
from smile_ray.kinds import Section, TaskPoolConfig, TaskScores, register_task_pool

TASK_FIELDS = ("name", "metric")
DEFAULT_METRIC = "acc"


def metric_key(metric: str) -> tuple[str, str]:
    """(metric, filter) of lm-eval's "<metric>,<filter>" ("none" when no filter is named)."""
    name, _, filter_name = metric.partition(",")
    return name, filter_name or "none"


def metric_label(metric: str, stderr: bool = False) -> str:
    """The report's name of an lm-eval metric: "exact_match,flexible-extract" → "exact_match.flexible-extract"."""
    name, filter_name = metric_key(metric)
    name += "_stderr" if stderr else ""
    return name if filter_name == "none" else f"{name}.{filter_name}"


@register_task_pool("lm_eval", loader="smile_ray.tasks.lm_eval:load_pool")
@dataclass(frozen=True)
class LmEvalConfig(TaskPoolConfig):
    tasks: tuple                                  # task names, or {name, metric} mappings
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    include_path: str | None = None

    keys = ("tasks", "num_fewshot", "limit", "batch_size", "include_path")

    @classmethod
    def parse(cls, section: Section) -> LmEvalConfig:
        tasks = section.get("tasks", list, "a list of lm-eval task names or {name, metric} mappings")
        if not tasks:
            raise SmileError(f"{section.where('tasks')}: empty list")
        entries = []
        for i, entry in enumerate(tasks):
            where = f"{section.where('tasks')}[{i}]"
            if isinstance(entry, str) and entry:
                entry = {"name": entry}
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise SmileError(f"{where}: expected a task name or a mapping with a name, got {entry!r}")
            for key in entry:
                if key not in TASK_FIELDS:
                    raise SmileError(f"{where}.{key}: unknown key (known: {', '.join(TASK_FIELDS)})")
            metric = entry.get("metric", DEFAULT_METRIC)
            if not isinstance(metric, str) or not metric_key(metric)[0]:
                raise SmileError(f"{where}.metric: expected an lm-eval metric such as acc_norm or "
                                 f"'exact_match,flexible-extract', got {metric!r}")
            entries.append({"name": entry["name"], "metric": metric})
        names = [entry["name"] for entry in entries]
        if len(set(names)) != len(names):
            raise SmileError(f"{section.where('tasks')}: a task is listed twice in {names}")
        limit = section.get("limit", (int, float), "a number of examples (or a fraction below 1)", None)
        if limit is not None and limit <= 0:
            raise SmileError(f"{section.where('limit')}: must be positive, got {limit}")
        include_path = section.get("include_path", str, "a directory of task YAMLs", None)
        if include_path is not None:
            if not os.path.isdir(include_path):
                raise SmileError(f"{section.where('include_path')}: no such directory {include_path!r}")
            include_path = os.path.abspath(include_path)
        return cls(tasks=tuple(entries), num_fewshot=section.get("num_fewshot", int, "an integer", None, minimum=0),
                   limit=limit, batch_size=section.get("batch_size", int, "an integer", 8, minimum=1),
                   include_path=include_path)

    def scores(self) -> dict[str, TaskScores]:
        return {entry["name"]: TaskScores(names=(metric_label(entry["metric"]),
                                                 metric_label(entry["metric"], stderr=True)),
                                          primary=metric_label(entry["metric"])) for entry in self.tasks}

    def check(self) -> None:
        """Every task exists, declares its metric, and can reach its dataset (imports lm-eval, not torch)."""
        from smile_ray.tasks.lm_eval_tasks import check_tasks

        check_tasks(self)
