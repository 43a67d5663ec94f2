"""GLUE as text generation, FusionBench's Flan-T5 protocol (smile-facts §4.2): each example becomes a prompt from
its task's template, the model generates greedily (max_length 10, the decoder start token included), and the
decoded text is scored against the label's text: exact string match for the classification tasks (accuracy),
Spearman's ρ of the parsed number for STS-B (0.0 where the output is no number). Each task also reports the share
of outputs that are none of its label texts (classification) or no number (STS-B): `unparsable`.

One deviation from the reference, deliberate: a batch is padded to its longest prompt and generated with its
attention mask (the reference pads every prompt to the tokenizer's maximum length and passes no mask, so padding
tokens take part in the encoder's attention).
"""
from __future__ import annotations

import json
import math
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.tasks.evaluation import EvaluatorBase, TaskDoneCallback, evaluate_each
from smile_ray.tasks.splits import load_split

REGRESSION_TASKS = ("stsb",)


@lru_cache(maxsize=1)
def prompts() -> dict[str, dict[str, Any]]:
    """task → {"input_text": template with {column} fields, "target_text": {label: text} or a float format}."""
    text = resources.files("smile_ray.tasks").joinpath("data/glue_t5_prompts.json").read_text("utf-8")
    return json.loads(text)["tasks"]


def target_text(task: str, label: float | int) -> str:
    """The text a model should generate for `label`: the label's word, or STS-B's score as "3.8"."""
    targets = prompts()[task]["target_text"]
    if isinstance(targets, str):
        return targets.format(float(label))
    return targets.get(str(int(label)), "")              # a label outside the class set (−1 in test splits): ""


def input_text(task: str, row: dict[str, Any], template: str | None = None) -> str:
    """The prompt of a row: `template` (default: the task's Flan-T5 template) with the row's columns filled in."""
    return (template or prompts()[task]["input_text"]).format(**row)


def template_columns(template: str) -> list[str]:
    """The dataset columns a template reads ("{sentence1}", …)."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def spearman(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Spearman's ρ (0.0 when either side is constant, where ρ is undefined)."""
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # a constant side: ρ is NaN, returned as 0.0 below
        rho = spearmanr(predictions, targets).statistic
    return 0.0 if rho is None or math.isnan(rho) else float(rho)


def parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score(task: str, predictions: Sequence[str], labels: Sequence[float | int]) -> dict[str, float]:
    """{"accuracy" or "spearman_rho", "unparsable"} of decoded `predictions` against dataset `labels`."""
    if task in REGRESSION_TASKS:
        parsed = [parse_float(text) for text in predictions]
        return {"spearman_rho": spearman([0.0 if v is None else v for v in parsed], [float(y) for y in labels]),
                "unparsable": sum(v is None for v in parsed) / len(parsed)}
    targets = [target_text(task, y) for y in labels]
    words = set(prompts()[task]["target_text"].values())
    return {"accuracy": sum(p == t for p, t in zip(predictions, targets)) / len(targets),
            "unparsable": sum(p not in words for p in predictions) / len(predictions)}


@dataclass
class GlueTask:
    """One GLUE task: its name (the template), where its data is, and which split is evaluated."""

    name: str
    dataset: str = "glue"                         # hub id (config = name) or a save_to_disk directory
    split: str | None = None                      # default: validation (mnli: validation_matched)
    dataset_config: str | None = None             # default for a hub id: the task name
    template: str | None = None                   # the prompt, "{column}" fields (default: the Flan-T5 template)

    @property
    def eval_split(self) -> str:
        return self.split or ("validation_matched" if self.name == "mnli" else "validation")

    @property
    def prompt(self) -> str:
        return self.template or prompts()[self.name]["input_text"]


class GlueTextGenerationTaskPool(EvaluatorBase):
    """Evaluates seq2seq models on GLUE tasks by generation. Datasets are loaded and prompts tokenized once per pool
    (`prepare()`), then reused by every `evaluate` call. `max_samples` keeps the first N rows of each split."""

    def __init__(self, tokenizer: Any, tasks: Sequence[GlueTask], *, batch_size: int = 32,
                 max_samples: int | None = None, max_length: int = 10, device: str | torch.device | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.batch_size, self.max_samples, self.max_length = batch_size, max_samples, max_length
        self.device = torch.device(device) if device is not None else None
        self._data: dict[str, tuple[list[str], list[float]]] = {}

    def task_data(self, task: GlueTask) -> tuple[list[str], list[float]]:
        """(prompts, labels) of the task's split, loaded once."""
        if task.name not in self._data:
            where = f"task {task.name}: dataset {task.dataset!r}"
            config = task.dataset_config or (task.name if task.dataset in ("glue", "nyu-mll/glue") else None)
            rows = load_split(task.dataset, split=task.eval_split, config=config, where=where)
            missing = [c for c in [*template_columns(task.prompt), "label"] if c not in rows.column_names]
            if missing:
                raise SmileError(f"{where}: no column {missing[0]!r} (columns: {', '.join(rows.column_names)})")
            if self.max_samples is not None:
                rows = rows.select(range(min(self.max_samples, len(rows))))
            if len(rows) == 0:
                raise SmileError(f"{where}: split {task.eval_split!r} has no samples")
            self._data[task.name] = ([input_text(task.name, row, task.prompt) for row in rows],
                                     list(rows["label"]))
        return self._data[task.name]

    def prepare(self) -> None:
        for task in self.tasks:
            self.task_data(task)

    @torch.no_grad()
    def generate(self, model: nn.Module, texts: Sequence[str]) -> list[str]:
        """Greedy generations of `texts`, decoded without special tokens, batch by batch."""
        device = self.resolved_device()
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                                   truncation=True).to(device)
            generated = model.generate(**batch, max_length=self.max_length, do_sample=False, num_beams=1)
            outputs += self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return outputs

    def evaluate_task(self, model: nn.Module, task: GlueTask) -> dict[str, float]:
        texts, labels = self.task_data(task)
        return {**score(task.name, self.generate(model, texts), labels), "samples": len(texts)}

    def evaluate(self, model: nn.Module, *, on_task_done: TaskDoneCallback | None = None
                 ) -> dict[str, dict[str, float]]:
        """{task: {"accuracy" | "spearman_rho", "unparsable"}}; on_task_done(task, {…, "samples", "seconds"},
        results so far) after each task."""
        return evaluate_each(model, self.tasks, self.evaluate_task, device=self.resolved_device(),
                             on_task_done=on_task_done)


def load_pool(config, models, device: str | torch.device | None = None) -> GlueTextGenerationTaskPool:
    """The task pool a `task_pool: {kind: glue_text_generation}` section describes, with the model pool's tokenizer
    (smile_ray.kinds.glue)."""
    tasks = [GlueTask(entry) if isinstance(entry, str) else GlueTask(**entry) for entry in config.tasks]
    return GlueTextGenerationTaskPool(models.load_tokenizer(), tasks, batch_size=config.batch_size,
                                      max_samples=config.max_samples, max_length=config.max_length, device=device)
