"""The embedded benchmark as pools: its build loaded as a clip_vision model pool and a clip_zero_shot task pool
(smile_ray.kinds.embedded names these loaders)."""
from __future__ import annotations

import torch

from smile_ray.embedded.build import build_embedded
from smile_ray.kinds.embedded import EmbeddedModels, EmbeddedTasks
from smile_ray.pools.clip_vision import ClipVisionPool
from smile_ray.tasks.clip_zero_shot import ClipZeroShotTaskPool


def load_model_pool(config: EmbeddedModels) -> ClipVisionPool:
    """The pretrained tiny CLIP's vision tower and the eight fine-tuned ones (built first if not cached)."""
    bench = build_embedded(config.cache_dir, scale=config.scale or "full")
    return ClipVisionPool(base=str(bench.clip_dir), experts={name: str(path) for name, path in bench.experts.items()})


def load_task_pool(config: EmbeddedTasks, models: ClipVisionPool,
                   device: torch.device | str | None = None) -> ClipZeroShotTaskPool:
    """The benchmark's tasks named in the config, scored with its own CLIP's text tower."""
    bench = build_embedded(config.cache_dir, scale=config.scale or "full")
    by_name = {task.name: task for task in bench.tasks}
    return ClipZeroShotTaskPool(str(bench.clip_dir), [by_name[name] for name in config.tasks],
                                batch_size=config.batch_size, num_workers=config.num_workers,
                                max_samples=config.max_samples, device=device)
