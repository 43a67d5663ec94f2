"""One configuration, in-process: load the pools, merge with one method, evaluate, report.

`run_trial` is what `python -m smile_ray.run` calls once and what every Ray Tune trial calls; it
knows nothing about command lines, Ray or MLflow. A configuration is a mapping:

    model_pool: {kind: embedded}                       or {kind: clip_vision, base: ID|DIR, experts: {name: ID|DIR}}
    task_pool:  {kind: embedded, max_samples: 64}      or {kind: clip_zero_shot, tasks: [sun397, …], batch_size: 128}
    method:     {name: smile, gate_k: 16, k: 32, top_k: 1}
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smile_ray.errors import SmileError
from smile_ray.methods import get_method
from smile_ray.pools.clip_vision import ClipVisionPool
from smile_ray.report import build_report
from smile_ray.smile import SvdCache, parameter_report
from smile_ray.smile.checkpoint import save_model
from smile_ray.spec import checked_pools
from smile_ray.tasks.clip_zero_shot import ClipTask, ClipZeroShotTaskPool
from smile_ray.tasks.ta8 import ta8_tasks

TaskDone = Callable[[str, dict, dict], None]
TASK_POOL_OPTIONS = ("batch_size", "num_workers", "max_samples")


@dataclass
class Pools:
    """The loaded-once part of a configuration: where the models are, and the evaluator."""

    models: ClipVisionPool
    tasks: ClipZeroShotTaskPool


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    section = config.get(key)
    if not isinstance(section, Mapping):
        raise SmileError(f"{key}: missing or not a mapping")
    return dict(section)


def _embedded(*sections: dict[str, Any]):
    """The embedded benchmark, built on first use; `scale` and `cache_dir` may sit in either pool section."""
    from smile_ray.embedded import build_embedded      # import only when asked for

    options = {}
    for section in reversed(sections):
        if section.get("kind") == "embedded":
            options.update({key: section.pop(key) for key in ("scale", "cache_dir") if key in section})
    return build_embedded(options.get("cache_dir"), scale=options.get("scale", "full"))


def _select_tasks(available: list[ClipTask], names: list[str] | None) -> list[ClipTask]:
    """The named tasks (names already checked against the recipe by `checked_pools`), all when None."""
    by_name = {task.name: task for task in available}
    return available if names is None else [by_name[name] for name in names]


def task_list(entries: list) -> list[ClipTask]:
    """TA8 names, or mappings with the ClipTask fields for other datasets (the list already checked by
    `spec.checked_pools`: non-empty, each entry a known TA8 name or a mapping)."""
    tasks = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            tasks.extend(ta8_tasks([entry]))
            continue
        try:
            tasks.append(ClipTask(**entry))
        except TypeError as error:
            raise SmileError(f"task_pool.tasks[{i}]: {error}") from None
    return tasks


def build_pools(config: Mapping[str, Any], device: torch.device | str | None = None) -> Pools:
    """Resolve `model_pool` and `task_pool` (building the embedded benchmark if it is named)."""
    model_section, task_section = checked_pools(config)
    model_kind, task_kind = model_section.get("kind"), task_section.get("kind")
    embedded = _embedded(model_section, task_section) if "embedded" in (model_kind, task_kind) else None
    model_section.pop("kind", None), task_section.pop("kind", None)
    options = {key: task_section.pop(key) for key in TASK_POOL_OPTIONS if key in task_section}

    if model_kind == "embedded":
        models = ClipVisionPool(base=str(embedded.clip_dir), experts={n: str(p) for n, p in embedded.experts.items()})
    else:
        models = ClipVisionPool.from_dict(model_section)

    if task_kind == "embedded":
        tasks, clip_model = _select_tasks(embedded.tasks, task_section.pop("tasks", None)), str(embedded.clip_dir)
    else:
        tasks, clip_model = task_list(task_section.pop("tasks")), task_section.pop("clip_model", None)
        if clip_model is None:              # the base model's own CLIP, at the revision its vision tower came from
            clip_model, options["revision"] = models.base, models.revision
    return Pools(models, ClipZeroShotTaskPool(clip_model, tasks, device=device, **options))


def run_trial(config: Mapping[str, Any], *, pools: Pools | None = None, svd_cache: SvdCache | str | Path | None = None,
              device: torch.device | str | None = None, on_task_done: TaskDone | None = None,
              save_model_dir: str | Path | None = None) -> dict[str, Any]:
    """Merge and evaluate one configuration; returns the FusionBench-style report.

    pools: reuse already-resolved pools (datasets and text heads are then prepared only once).
    svd_cache: directory (or SvdCache) of truncated SVDs shared between runs.
    on_task_done(task, metrics, running): called after each task with the running results.
    save_model_dir: also write the merged model there (safetensors, loads back with checkpoint.load_model).
    """
    device = torch.device(device) if device is not None else default_device()
    method_section = _section(config, "method")
    method = get_method(method_section.pop("name", None))
    params = method.resolve(method_section)
    pools = pools or build_pools(config, device)

    start = time.perf_counter()
    base = pools.models.load_base()
    experts = {name: pools.models.load_expert(name)
               for name in method.needed_experts(params, pools.models.expert_names)}
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    merged = method.merge(base, experts, svd_cache=svd_cache, device=device, **params)
    merge_seconds = time.perf_counter() - start
    info = getattr(merged, "smile_info", None)
    del experts

    start = time.perf_counter()
    results = pools.tasks.evaluate(merged, on_task_done=on_task_done)
    eval_seconds = time.perf_counter() - start

    counts = parameter_report(merged, base)
    timings = {"load_seconds": load_seconds, "svd_seconds": info.svd_seconds if info else 0.0,
               "upscale_seconds": merge_seconds, "eval_seconds": eval_seconds}
    model_info = {**counts, "svd_calls": info.svd_computed if info else 0,
                  "svd_cache_hits": info.svd_cache_hits if info else 0}
    report = build_report(results, model=merged, name=method.name, model_info=model_info, timings=timings)
    if save_model_dir is not None:
        save_model(merged.to("cpu"), save_model_dir)
    return report
