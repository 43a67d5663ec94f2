"""`model_pool: {kind: embedded_t5}` and `task_pool: {kind: embedded_glue}`: the embedded text benchmark (a tiny T5
and eight GLUE-shaped tasks, each with a fully fine-tuned and a LoRA expert), built on first use and cached, then
loaded as a seq2seq pool and a glue_text_generation task pool. `scale` and `cache_dir` may sit in either section."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.embedded.text_recipe import TASKS, TEXT_RECIPES
from smile_ray.kinds import (ModelPoolConfig, Section, TaskPoolConfig, register_model_pool, register_task_pool,
                             task_entries)
from smile_ray.kinds.embedded import join_build_options
from smile_ray.kinds.glue import generation_options, glue_scores

TASK_NAMES = tuple(task.name for task in TASKS)


def text_build_options(section: Section) -> dict[str, str | None]:
    return {"scale": section.get("scale", str, "a scale name", None, choices=tuple(TEXT_RECIPES)),
            "cache_dir": section.get("cache_dir", str, "a directory", None)}


@register_model_pool("embedded_t5", loader="smile_ray.embedded.text_pools:load_model_pool")
@dataclass(frozen=True)
class EmbeddedT5Models(ModelPoolConfig):
    experts: str = "full"                         # full: fully fine-tuned experts; lora: LoRA-16 adapters
    scale: str | None = None
    cache_dir: str | None = None

    keys = ("experts", "scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedT5Models:
        return cls(experts=section.get("experts", str, "full or lora", "full", choices=("full", "lora")),
                   **text_build_options(section))

    def expert_names(self) -> list[str]:
        return list(TASK_NAMES)

    def with_tasks(self, tasks: TaskPoolConfig) -> EmbeddedT5Models:
        return join_build_options(self, tasks, (EmbeddedGlueTasks,))


@register_task_pool("embedded_glue", loader="smile_ray.embedded.text_pools:load_task_pool")
@dataclass(frozen=True)
class EmbeddedGlueTasks(TaskPoolConfig):
    tasks: tuple[str, ...] = TASK_NAMES
    batch_size: int = 32
    max_samples: int | None = None
    max_length: int = 10
    scale: str | None = None
    cache_dir: str | None = None

    keys = ("tasks", "batch_size", "max_samples", "max_length", "scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedGlueTasks:
        return cls(tasks=task_entries(section, TASK_NAMES, default=TASK_NAMES), **generation_options(section),
                   **text_build_options(section))

    def scores(self):
        return glue_scores(self.tasks)

    def with_models(self, models: ModelPoolConfig) -> EmbeddedGlueTasks:
        return join_build_options(self, models, (EmbeddedT5Models,))
