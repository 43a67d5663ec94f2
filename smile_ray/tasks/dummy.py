"""The task pool that evaluates nothing (smile_ray.kinds.dummy)."""
from __future__ import annotations

from smile_ray.kinds.dummy import DummyConfig
from smile_ray.tasks.evaluation import EvaluatorBase


class DummyTaskPool(EvaluatorBase):
    tasks: tuple = ()

    def __init__(self, device=None) -> None:
        self.device = device

    def prepare(self) -> None:
        pass

    def evaluate(self, model, *, on_task_done=None) -> dict:
        return {}


def load_pool(config: DummyConfig, models, device=None) -> DummyTaskPool:
    return DummyTaskPool(device)
