"""The embedded causal-LM benchmark as pools: its build loaded as a causal_lm model pool and an lm_eval task pool
(smile_ray.kinds.embedded_lm names these loaders)."""
from __future__ import annotations

import torch

from smile_ray.embedded.lm_build import build_lm_benchmark
from smile_ray.kinds.causal_lm import CausalLMConfig
from smile_ray.kinds.embedded_lm import EmbeddedLmModels, EmbeddedLmTasks
from smile_ray.kinds.lm_eval import LmEvalConfig
from smile_ray.pools.causal_lm import CausalLMPool
from smile_ray.tasks.lm_eval import LmEvalTaskPool


def load_model_pool(config: EmbeddedLmModels) -> CausalLMPool:
    """The pretrained tiny Mistral and one expert per skill (built first if not cached)."""
    bench = build_lm_benchmark(config.cache_dir, scale=config.scale or "full")
    return CausalLMPool(CausalLMConfig(base=str(bench.base_dir),
                                       experts={name: str(path) for name, path in bench.experts.items()}))


def load_task_pool(config: EmbeddedLmTasks, models: CausalLMPool,
                   device: torch.device | str | None = None) -> LmEvalTaskPool:
    """The build's lm-eval tasks named in the config, through the lm_eval task pool."""
    bench = build_lm_benchmark(config.cache_dir, scale=config.scale or "full")
    tasks = tuple({"name": name, "metric": metric} for name, metric in config.metrics().items())
    return LmEvalTaskPool(LmEvalConfig(tasks=tasks, limit=config.limit, batch_size=config.batch_size,
                                       include_path=str(bench.tasks_dir)), models.load_tokenizer(), device)
