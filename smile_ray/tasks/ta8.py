"""The eight CLIP tasks of task arithmetic / FusionBench (TA8): datasets, class names, templates (smile-facts §4.1)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from smile_ray.errors import SmileError

if TYPE_CHECKING:   # the task pool (torch, transformers, datasets) is imported only to build tasks
    from smile_ray.tasks.clip_zero_shot import ClipTask

TA8_TASK_NAMES: tuple[str, ...] = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")

# task -> (hub id, config); all use the "test" split, columns "image" and "label"
TA8_DATASETS: dict[str, tuple[str, str | None]] = {
    "sun397": ("tanganke/sun397", None),
    "stanford-cars": ("tanganke/stanford_cars", None),
    "resisc45": ("tanganke/resisc45", None),
    "eurosat": ("tanganke/eurosat", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("tanganke/gtsrb", None),
    "mnist": ("ylecun/mnist", None),
    "dtd": ("tanganke/dtd", None),
}


@lru_cache(maxsize=1)
def _package_data() -> dict[str, Any]:
    text = resources.files("smile_ray.tasks").joinpath("data/ta8_classnames_templates.json").read_text("utf-8")
    return json.loads(text)["tasks"]


def classnames_templates(name: str) -> tuple[list[str], list[str]]:
    """(class names, templates with "{c}") of a TA8 task; the package data spells stanford-cars stanford_cars."""
    entry = _package_data()[check_task_names([name])[0].replace("-", "_")]
    return list(entry["classnames"]), list(entry["templates"])


def check_task_names(names: Sequence[str] | str) -> list[str]:
    """The names as a list, or a SmileError naming the first unknown one and listing the valid ones."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in TA8_DATASETS:
            raise SmileError(f"tasks: unknown TA8 task {name!r} (valid: {', '.join(TA8_TASK_NAMES)})")
    if len(set(names)) != len(names):
        raise SmileError(f"tasks: a task is listed twice in {names}")
    return names


def ta8_tasks(names: Sequence[str] | str | None = None, *, split: str = "test",
              overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[ClipTask]:
    """The TA8 tasks (all eight in FusionBench's order by default) as `ClipTask`s on their hub datasets.

    `overrides` maps a task name to `ClipTask` fields to replace, e.g.
    `{"mnist": {"dataset": "/data/mnist"}, "svhn": {"image_column": "img"}}` (a local `save_to_disk` copy,
    or a column renamed by a newer dataset revision).
    """
    from smile_ray.tasks.clip_zero_shot import ClipTask

    names = check_task_names(TA8_TASK_NAMES if names is None else names)
    overrides = dict(overrides or {})
    check_task_names(list(overrides))
    allowed = {f.name for f in dataclasses.fields(ClipTask)} - {"name"}
    tasks = []
    for name in names:
        dataset, config = TA8_DATASETS[name]
        classnames, templates = classnames_templates(name)
        task = ClipTask(name=name, dataset=dataset, classnames=classnames, templates=templates, split=split,
                        dataset_config=config)
        changes = dict(overrides.get(name, {}))
        bad = sorted(set(changes) - allowed)
        if bad:
            raise SmileError(f"overrides.{name}.{bad[0]}: not a ClipTask field (fields: {', '.join(sorted(allowed))})")
        tasks.append(dataclasses.replace(task, **changes))
    return tasks
