"""`model_pool: {kind: embedded}` and `task_pool: {kind: embedded}`: the embedded CLIP benchmark (a tiny CLIP, eight
fine-tuned vision towers, eight digit tasks), built on first use and cached, then loaded as a clip_vision pool and
a clip_zero_shot task pool. `scale` and `cache_dir` may be given in either section: the two pools are one build."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smile_ray.embedded.recipe import RECIPES, TASKS
from smile_ray.kinds import (ModelPoolConfig, Section, TaskPoolConfig, register_model_pool,
                             register_task_pool, task_entries)
from smile_ray.kinds.clip_zero_shot import CLASSIFICATION, evaluation_options

TASK_NAMES = tuple(task.name for task in TASKS)


def build_options(section: Section) -> dict[str, str | None]:
    return {"scale": section.get("scale", str, "a scale name", None, choices=tuple(RECIPES)),
            "cache_dir": section.get("cache_dir", str, "a directory", None)}


@register_model_pool("embedded", loader="smile_ray.embedded.pools:load_model_pool")
@dataclass(frozen=True)
class EmbeddedModels(ModelPoolConfig):
    scale: str | None = None                      # None: as the task pool says, else "full"
    cache_dir: str | None = None                  # None: $SMILE_RAY_CACHE/embedded or ~/.cache/smile_ray/embedded

    keys = ("scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedModels:
        return cls(**build_options(section))

    def expert_names(self) -> list[str]:
        return list(TASK_NAMES)

    def with_tasks(self, tasks: TaskPoolConfig) -> EmbeddedModels:
        return _joined(self, tasks)


@register_task_pool("embedded", loader="smile_ray.embedded.pools:load_task_pool")
@dataclass(frozen=True)
class EmbeddedTasks(TaskPoolConfig):
    sample_slices = True
    tasks: tuple[str, ...] = TASK_NAMES
    batch_size: int = 128
    num_workers: int = 0
    max_samples: int | None = None
    scale: str | None = None
    cache_dir: str | None = None

    keys = ("tasks", "batch_size", "num_workers", "max_samples", "scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedTasks:
        return cls(tasks=task_entries(section, TASK_NAMES, default=TASK_NAMES), **evaluation_options(section),
                   **build_options(section))

    def scores(self):
        return {name: CLASSIFICATION for name in self.tasks}

    def with_models(self, models: ModelPoolConfig) -> EmbeddedTasks:
        return _joined(self, models)


def join_build_options(config, other, partners: tuple[type, ...]):
    """`config` with the build options it leaves out (scale, cache_dir) taken from `other` when that is one of
    `partners` (the other half of the same build); its own win."""
    if not isinstance(other, partners):
        return config
    return dataclasses.replace(config, scale=config.scale or other.scale, cache_dir=config.cache_dir or other.cache_dir)


def _joined(config, other):
    return join_build_options(config, other, (EmbeddedModels, EmbeddedTasks))
