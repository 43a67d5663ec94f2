"""`task_pool: {kind: clip_zero_shot}`: zero-shot image classification with a CLIP text tower, FusionBench's protocol
(TA8 task names, or mappings naming any `datasets` dataset with its class names and templates)."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.kinds import REQUIRED, Section, TaskPoolConfig, TaskScores, register_task_pool, task_entries
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


@register_task_pool("clip_zero_shot", loader="smile_ray.tasks.clip_zero_shot:load_pool")
@dataclass(frozen=True)
class ClipZeroShotConfig(TaskPoolConfig):
    sample_slices = True
    tasks: tuple                                  # TA8 names, or mappings with the ClipTask fields
    clip_model: str | None = None                 # the full CLIPModel of the text side (default: the pool's base)
    batch_size: int = 128
    num_workers: int = 0
    max_samples: int | None = None                # the first N examples of each split

    keys = ("tasks", "clip_model", "batch_size", "num_workers", "max_samples")

    @classmethod
    def parse(cls, section: Section) -> ClipZeroShotConfig:
        return cls(tasks=task_entries(section, TA8_TASK_NAMES, REQUIRED, fields=TASK_FIELDS, required=TASK_REQUIRED),
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
