"""The embedded text benchmark as pools: its build loaded as a seq2seq model pool (full or LoRA experts) and a GLUE
text-generation task pool (smile_ray.kinds.embedded_text names these loaders)."""
from __future__ import annotations

import torch

from smile_ray.embedded.text_build import build_text_benchmark
from smile_ray.embedded.text_recipe import TASKS, template
from smile_ray.kinds.embedded_text import EmbeddedGlueTasks, EmbeddedT5Models
from smile_ray.kinds.seq2seq import Seq2SeqConfig
from smile_ray.pools.seq2seq import Seq2SeqPool
from smile_ray.tasks.glue import GlueTask, GlueTextGenerationTaskPool


def load_model_pool(config: EmbeddedT5Models) -> Seq2SeqPool:
    """The pretrained tiny T5 and the eight experts of the chosen kind (built first if not cached)."""
    bench = build_text_benchmark(config.cache_dir, scale=config.scale or "full")
    experts = bench.lora if config.experts == "lora" else bench.experts
    return Seq2SeqPool(Seq2SeqConfig(base=str(bench.base_dir), experts={name: str(p) for name, p in experts.items()}))


def load_task_pool(config: EmbeddedGlueTasks, models: Seq2SeqPool,
                   device: torch.device | str | None = None) -> GlueTextGenerationTaskPool:
    """The benchmark's tasks named in the config, generated with the T5's own tokenizer."""
    bench = build_text_benchmark(config.cache_dir, scale=config.scale or "full")
    tasks = {task.name: task for task in TASKS}
    return GlueTextGenerationTaskPool(models.load_tokenizer(),
                                      [GlueTask(name, dataset=str(bench.data[name]), template=template(tasks[name]))
                                       for name in config.tasks],
                                      batch_size=config.batch_size, max_samples=config.max_samples,
                                      max_length=config.max_length, device=device)
