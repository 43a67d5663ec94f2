"""`task_pool: {kind: dummy}` (the reference's name): no evaluation. A trial reports the model's parameter counts
and timings only: for "upscale and save" (`python -m smile_ray.run --save-model DIR`, a sweep's `save_model`)."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.kinds import Section, TaskPoolConfig, TaskScores, register_task_pool


@register_task_pool("dummy", loader="smile_ray.tasks.dummy:load_pool")
@dataclass(frozen=True)
class DummyConfig(TaskPoolConfig):
    @classmethod
    def parse(cls, section: Section) -> DummyConfig:
        return cls()

    def scores(self) -> dict[str, TaskScores]:
        return {}
