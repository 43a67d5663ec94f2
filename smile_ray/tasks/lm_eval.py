"""Evaluation with lm-evaluation-harness, in-process (smile_ray.kinds.lm_eval): the merged model wrapped in lm-eval's
HFLM (no save and reload), one `simple_evaluate` per task, so each task is reported as it finishes."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.kinds.lm_eval import LmEvalConfig, metric_key, metric_label
from smile_ray.tasks.evaluation import EvaluatorBase, TaskDoneCallback, evaluate_each
from smile_ray.tasks.lm_eval_tasks import manager_for


@dataclass(frozen=True)
class LmEvalTask:
    name: str
    metric: str                                   # lm-eval's "<metric>[,<filter>]"


class LmEvalTaskPool(EvaluatorBase):
    def __init__(self, config: LmEvalConfig, tokenizer: Any, device: str | torch.device | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.tasks = [LmEvalTask(entry["name"], entry["metric"]) for entry in config.tasks]
        self.device = torch.device(device) if device is not None else None
        self.manager = None

    def prepare(self) -> None:
        if self.manager is None:
            self.manager = manager_for(self.config)

    def evaluate(self, model: nn.Module, *, on_task_done: TaskDoneCallback | None = None
                 ) -> dict[str, dict[str, float]]:
        """{task: {metric, metric_stderr}}; on_task_done after each task."""
        from datasets.utils.logging import disable_progress_bar
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)     # its notes on model objects and cached splits
        disable_progress_bar()
        self.prepare()
        device = self.resolved_device()
        model.to(device)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.config.batch_size, device=str(device))
        return evaluate_each(model, self.tasks, lambda _, task: self.evaluate_task(lm, task), device=device,
                             on_task_done=on_task_done)

    def evaluate_task(self, lm: Any, task: LmEvalTask) -> dict[str, float]:
        import lm_eval

        out = lm_eval.simple_evaluate(model=lm, tasks=[task.name], num_fewshot=self.config.num_fewshot,
                                      limit=self.config.limit, task_manager=self.manager, log_samples=False)
        results = out["results"].get(task.name, {})
        metric, filter_name = metric_key(task.metric)
        value = results.get(f"{metric},{filter_name}")
        if not isinstance(value, (int, float)):
            raise SmileError(f"task {task.name}: lm-eval reported no {task.metric!r} (it reported "
                             f"{', '.join(k for k in results if ',' in k) or 'nothing'})")
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        samples = sum(int(n.get("effective", 0)) for n in out.get("n-samples", {}).values())
        return {metric_label(task.metric): float(value),
                metric_label(task.metric, stderr=True): float(stderr) if isinstance(stderr, (int, float))
                else float("nan"), "samples": samples}


def load_pool(config: LmEvalConfig, models, device: str | torch.device | None = None) -> LmEvalTaskPool:
    """lm-eval tasks on the model pool's tokenizer."""
    return LmEvalTaskPool(config, models.load_tokenizer(), device)
