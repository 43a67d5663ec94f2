"""`model_pool: {kind: embedded_lm}` and `task_pool: {kind: embedded_lm_tasks}`: the embedded causal-LM benchmark (a
tiny Mistral and one expert per skill, with an lm-eval task per skill), built on first use and cached, then loaded
as a causal_lm pool and an lm_eval task pool. `scale` and `cache_dir` may sit in either section."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.embedded.lm_recipe import LM_RECIPES, SKILLS
from smile_ray.kinds import (ModelPoolConfig, Section, TaskPoolConfig, TaskScores, register_model_pool,
                             register_task_pool, task_entries)
from smile_ray.kinds.embedded import join_build_options

SKILL_NAMES = tuple(skill.name for skill in SKILLS)
METRICS = {"generate_until": "exact_match", "multiple_choice": "acc_norm"}     # each task's primary metric


def lm_build_options(section: Section) -> dict[str, str | None]:
    return {"scale": section.get("scale", str, "a scale name", None, choices=tuple(LM_RECIPES)),
            "cache_dir": section.get("cache_dir", str, "a directory", None)}


@register_model_pool("embedded_lm", loader="smile_ray.embedded.lm_pools:load_model_pool")
@dataclass(frozen=True)
class EmbeddedLmModels(ModelPoolConfig):
    scale: str | None = None
    cache_dir: str | None = None

    keys = ("scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedLmModels:
        return cls(**lm_build_options(section))

    def expert_names(self) -> list[str]:
        return list(SKILL_NAMES)

    def with_tasks(self, tasks: TaskPoolConfig) -> EmbeddedLmModels:
        return join_build_options(self, tasks, (EmbeddedLmTasks,))


@register_task_pool("embedded_lm_tasks", loader="smile_ray.embedded.lm_pools:load_task_pool")
@dataclass(frozen=True)
class EmbeddedLmTasks(TaskPoolConfig):
    tasks: tuple[str, ...] = SKILL_NAMES
    limit: int | None = None                      # examples per task (default: all 200)
    batch_size: int = 32
    scale: str | None = None
    cache_dir: str | None = None

    keys = ("tasks", "limit", "batch_size", "scale", "cache_dir")

    @classmethod
    def parse(cls, section: Section) -> EmbeddedLmTasks:
        return cls(tasks=task_entries(section, SKILL_NAMES, default=SKILL_NAMES),
                   limit=section.get("limit", int, "an integer", None, minimum=1),
                   batch_size=section.get("batch_size", int, "an integer", 32, minimum=1), **lm_build_options(section))

    def metrics(self) -> dict[str, str]:
        """task → the lm-eval metric that is its score."""
        outputs = {skill.name: skill.output for skill in SKILLS}
        return {name: METRICS[outputs[name]] for name in self.tasks}

    def scores(self) -> dict[str, TaskScores]:
        return {name: TaskScores(names=(metric, f"{metric}_stderr"), primary=metric)
                for name, metric in self.metrics().items()}

    def with_models(self, models: ModelPoolConfig) -> EmbeddedLmTasks:
        return join_build_options(self, models, (EmbeddedLmModels,))
