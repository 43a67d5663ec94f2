"""The embedded benchmark: a no-download, CPU-sized stand-in for the paper's eight-task CLIP benchmark.

`build_embedded()` returns a pretrained tiny CLIP, eight fine-tuned vision towers and eight digit tasks, all
saved in the formats the real CLIP pools load (built on first use, then cached).
"""
from smile_ray.embedded.recipe import RECIPES, TASKS, Recipe, TaskSpec

__all__ = ["EmbeddedBenchmark", "RECIPES", "Recipe", "TASKS", "TaskSpec", "benchmark_dir", "build_embedded",
           "default_cache_dir"]


def __getattr__(name: str):
    """The builder (torch, transformers, datasets, scikit-learn) loads on first use; the recipe's constants,
    which validation reads, do not need it."""
    if name in __all__:
        from smile_ray.embedded import build

        return getattr(build, name)
    raise AttributeError(f"module 'smile_ray.embedded' has no attribute {name!r}")
