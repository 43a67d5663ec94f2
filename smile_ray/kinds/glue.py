"""`task_pool: {kind: glue_text_generation}`: GLUE by greedy generation, FusionBench's Flan-T5 protocol (cola, mnli,
mrpc, qnli, qqp, rte, sst2: accuracy by exact match; stsb: Spearman ρ), with the model pool's tokenizer."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from smile_ray.kinds import Section, TaskPoolConfig, TaskScores, register_task_pool, task_entries
from smile_ray.sources import Source

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
TASK_FIELDS = ("name", "dataset", "split", "dataset_config", "template")
CLASSIFICATION = TaskScores(names=("accuracy", "unparsable"), primary="accuracy")
REGRESSION = TaskScores(names=("spearman_rho", "unparsable"), primary="spearman_rho")


def generation_options(section: Section) -> dict[str, int | None]:
    return {"batch_size": section.get("batch_size", int, "an integer", 32, minimum=1),
            "max_samples": section.get("max_samples", int, "an integer", None, minimum=1),
            "max_length": section.get("max_length", int, "an integer", 10, minimum=2)}


def glue_scores(names) -> dict[str, TaskScores]:
    return {name: REGRESSION if name == "stsb" else CLASSIFICATION for name in names}


@register_task_pool("glue_text_generation", loader="smile_ray.tasks.glue:load_pool")
@dataclass(frozen=True)
class GlueConfig(TaskPoolConfig):
    tasks: tuple = GLUE_TASKS
    batch_size: int = 32
    max_samples: int | None = None                # the first N examples of each split
    max_length: int = 10                          # generated tokens, the decoder start token included

    keys = ("tasks", "batch_size", "max_samples", "max_length")

    @classmethod
    def parse(cls, section: Section) -> GlueConfig:
        return cls(tasks=task_entries(section, GLUE_TASKS, GLUE_TASKS, fields=TASK_FIELDS, required=("name",),
                                      strings=TASK_FIELDS, mapped_names_known=True), **generation_options(section))

    def task_names(self) -> list[str]:
        return [entry if isinstance(entry, str) else entry["name"] for entry in self.tasks]

    def scores(self) -> dict[str, TaskScores]:
        return glue_scores(self.task_names())

    def sources(self) -> list[Source]:
        """Each distinct dataset once (the hub's `glue` holds every task)."""
        found: dict[str, Source] = {}
        for i, (name, entry) in enumerate(zip(self.task_names(), self.tasks)):
            dataset = entry.get("dataset", "glue") if isinstance(entry, Mapping) else "glue"
            found.setdefault(dataset, Source(f"task_pool.tasks[{i}] ({name})", dataset, repo_type="dataset"))
        return list(found.values())
