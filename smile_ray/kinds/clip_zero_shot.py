"""`task_pool: {kind: clip_zero_shot}`: zero-shot image classification with a CLIP text tower, FusionBench's protocol
(TA8 task names, or mappings naming any `datasets` dataset with its class names and templates)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from smile_ray.errors import SmileError
from smile_ray.kinds import Section, TaskPoolConfig, TaskScores, register_task_pool
from smile_ray.sources import Source
from smile_ray.tasks.ta8 import TA8_DATASETS, TA8_TASK_NAMES

CLASSIFICATION = TaskScores(names=("accuracy", "loss"), primary="accuracy")
TASK_FIELDS = ("name", "dataset", "classnames", "templates", "split", "dataset_config", "image_column",
               "label_column", "extra")                    # smile_ray.tasks.clip_zero_shot.ClipTask
TASK_REQUIRED = ("name", "dataset", "classnames", "templates")


def evaluation_options(section: Section) -> dict[str, int | None]:
    """batch_size, num_workers, max_samples: what every image task pool takes."""
    return {"batch_size": section.get("batch_size", int, "an integer", 128, minimum=1),
            "num_workers": section.get("num_workers", int, "an integer", 0, minimum=0),
            "max_samples": section.get("max_samples", int, "an integer", None, minimum=1)}


def task_entries(section: Section, known: tuple[str, ...], default: tuple[str, ...] | None = None) -> tuple:
    """`tasks:`: a non-empty list of names from `known`, or mappings with the ClipTask fields (when known is TA8)."""
    tasks = section.get("tasks", list, "a list of tasks", default)
    if tasks is None:
        return default
    if not tasks:
        raise SmileError(f"{section.where('tasks')}: empty list")
    names = []
    for i, entry in enumerate(tasks):
        where = f"{section.where('tasks')}[{i}]"
        if isinstance(entry, str):
            if entry not in known:
                raise SmileError(f"{where}: unknown task {entry!r} (known: {', '.join(known)}"
                                 f"{', or a mapping' if known is TA8_TASK_NAMES else ''})")
            names.append(entry)
        elif isinstance(entry, Mapping) and known is TA8_TASK_NAMES:
            for key in entry:
                if key not in TASK_FIELDS:
                    raise SmileError(f"{where}.{key}: unknown key (known: {', '.join(TASK_FIELDS)})")
            for key in TASK_REQUIRED:
                if key not in entry:
                    raise SmileError(f"{where}.{key}: missing")
            names.append(str(entry["name"]))
        else:
            raise SmileError(f"{where}: expected a task name{' or a mapping' if known is TA8_TASK_NAMES else ''}, "
                             f"got {entry!r}")
    if len(set(names)) != len(names):
        raise SmileError(f"{section.where('tasks')}: a task is listed twice in {names}")
    return tuple(tasks)


@register_task_pool("clip_zero_shot", loader="smile_ray.tasks.clip_zero_shot:load_pool")
@dataclass(frozen=True)
class ClipZeroShotConfig(TaskPoolConfig):
    tasks: tuple                                  # TA8 names, or mappings with the ClipTask fields
    clip_model: str | None = None                 # the full CLIPModel of the text side (default: the pool's base)
    batch_size: int = 128
    num_workers: int = 0
    max_samples: int | None = None                # the first N examples of each split

    keys = ("tasks", "clip_model", "batch_size", "num_workers", "max_samples")

    @classmethod
    def parse(cls, section: Section) -> ClipZeroShotConfig:
        return cls(tasks=task_entries(section, TA8_TASK_NAMES),
                   clip_model=section.get("clip_model", str, "a hub id or a directory", None),
                   **evaluation_options(section))

    def task_names(self) -> list[str]:
        return [entry if isinstance(entry, str) else str(entry["name"]) for entry in self.tasks]

    def scores(self) -> dict[str, TaskScores]:
        return {name: CLASSIFICATION for name in self.task_names()}

    def sources(self) -> list[Source]:
        sources = []
        for i, (name, entry) in enumerate(zip(self.task_names(), self.tasks)):
            dataset = TA8_DATASETS[entry][0] if isinstance(entry, str) else entry["dataset"]
            if isinstance(dataset, str):
                sources.append(Source(f"task_pool.tasks[{i}] ({name})", dataset, repo_type="dataset"))
        return sources
