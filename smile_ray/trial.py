"""One configuration, in-process: load the pools, merge with one method, evaluate, report.

`run_trial` is what `python -m smile_ray.run` calls once and what every Ray Tune trial calls; it
knows nothing about command lines, Ray or MLflow. A configuration is a mapping:

    model_pool: {kind: embedded}                       or {kind: clip_vision, base: ID|DIR, experts: {name: ID|DIR}}
    task_pool:  {kind: embedded, max_samples: 64}      or {kind: clip_zero_shot, tasks: [sun397, …], batch_size: 128}
    method:     {name: smile, gate_k: 16, k: 32, top_k: 1}

(any registered kind: smile_ray.kinds).
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
from smile_ray.kinds import ModelPool, ModelPoolConfig, TaskPool, TaskPoolConfig, TaskScores
from smile_ray.report import average_metrics, build_report, task_names
from smile_ray.smile import SvdCache, parameter_report
from smile_ray.smile.weights import as_weights
from smile_ray.smile.checkpoint import save_model
from smile_ray.smile.routing import RoutingRecorder, own_expert_share, shares
from smile_ray.spec import checked_pools
from smile_ray.tasks.evaluation import BOOKKEEPING, default_device, merge_sample_means

TaskDone = Callable[[str, dict, dict], None]
RungDone = Callable[[int, int, dict, dict], None]


@dataclass
class Pools:
    """The loaded-once part of a configuration: where the models are, the evaluator, and what each task reports."""

    models: ModelPool
    tasks: TaskPool
    scores: dict[str, TaskScores]

    @property
    def primary(self) -> dict[str, str]:
        """task → the metric that is its score."""
        return {task: scores.primary for task, scores in self.scores.items()}


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    section = config.get(key)
    if not isinstance(section, Mapping):
        raise SmileError(f"{key}: missing or not a mapping")
    return dict(section)


def load_pools(models: ModelPoolConfig, tasks: TaskPoolConfig, device: torch.device | str | None = None) -> Pools:
    """Load validated pool configs (finding or building the models; the task pool is prepared lazily)."""
    model_pool = models.load()
    return Pools(model_pool, tasks.load(model_pool, device), tasks.scores())


def build_pools(config: Mapping[str, Any], device: torch.device | str | None = None) -> Pools:
    """Validate and load the `model_pool` and `task_pool` sections of a configuration."""
    return load_pools(*checked_pools(config), device=device)


def rung_sizes(min_samples: int, reduction_factor: int, largest: int) -> list[int]:
    """Samples per task evaluated by the end of each rung: min_samples · reduction_factorⁱ below `largest`, then
    `largest` (every sample)."""
    sizes = []
    while min_samples < largest:
        sizes.append(min_samples)
        min_samples *= reduction_factor
    return [*sizes, largest]


def run_trial(config: Mapping[str, Any], *, pools: Pools | None = None, svd_cache: SvdCache | str | Path | None = None,
              device: torch.device | str | None = None, on_task_done: TaskDone | None = None,
              save_model_dir: str | Path | None = None, halving: tuple[int, int] | None = None,
              on_rung: RungDone | None = None) -> dict[str, Any]:
    """Merge and evaluate one configuration; returns the FusionBench-style report.

    pools: reuse already-resolved pools (datasets and text heads are then prepared only once).
    svd_cache: directory (or SvdCache) of truncated SVDs shared between runs.
    on_task_done(task, metrics, running): called after each task with the running results.
    save_model_dir: also write the merged model there (safetensors, loads back with checkpoint.load_model).
    halving: (min_samples, reduction_factor): evaluate in rungs (`rung_sizes`), every task's next samples per rung,
      calling on_rung(rung, samples per task, running results, task → samples evaluated) after each rung but the
      last (the pool must have sample_slices).
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
    merged = method.apply(base, experts, params, svd_cache=svd_cache, device=device)
    merge_seconds = time.perf_counter() - start
    info = getattr(merged, "smile_info", None)
    del experts

    recorder = RoutingRecorder(merged)
    routed: dict[str, dict[str, torch.Tensor]] = {}        # task → layer → tokens whose first choice was each expert
    evaluated: dict[str, int] = {}                          # task → samples evaluated

    def count_samples(task: str, samples: int) -> None:      # and the task's routing counts since the last call
        evaluated[task] = evaluated.get(task, 0) + samples
        into = routed.setdefault(task, {})
        for layer, counts in recorder.take_counts().items():
            into[layer] = into[layer] + counts if layer in into else counts

    def with_average(running: dict) -> dict:
        done = {name: running[name] for name in task_names(running)}
        return {**done, "average": average_metrics(done, pools.primary)}

    def rung_done(rung: int, size: int, running: dict) -> None:
        if on_rung is not None:
            on_rung(rung, size, running, dict(evaluated))

    def task_done(task: str, metrics: dict, running: dict) -> None:        # the running average, with its score
        count_samples(task, metrics["samples"])
        if on_task_done is not None:
            on_task_done(task, metrics, with_average(running))

    start = time.perf_counter()
    with recorder:
        if halving is None:
            results = pools.tasks.evaluate(merged, on_task_done=task_done)
        else:
            results = _evaluate_in_rungs(pools.tasks, merged, halving, count_samples, with_average, rung_done)
    eval_seconds = time.perf_counter() - start

    counts = parameter_report(merged, as_weights(base).parameter_count())
    timings = {"load_seconds": load_seconds, "svd_seconds": info.svd_seconds if info else 0.0,
               "upscale_seconds": merge_seconds, "eval_seconds": eval_seconds,
               "eval_samples": sum(evaluated.values())}          # what evaluation cost: seconds, and samples
    model_info = {**counts, "svd_calls": info.svd_computed if info else 0,
                  "svd_cache_hits": info.svd_cache_hits if info else 0}
    report = build_report(results, model=merged, name=method.name, model_info=model_info, timings=timings,
                          primary=pools.primary)
    routing = {task: {layer: shares(counts) for layer, counts in layers.items()} for task, layers in routed.items()
               if layers}
    if routing:                                  # SMILE: where each task's tokens went, and how many to its own expert
        own = own_expert_share(routing, pools.models.expert_names)
        report["routing"] = {"experts": list(pools.models.expert_names), "tasks": routing,
                             **({"own_expert_share": sum(own.values()) / len(own)} if own else {})}
    if save_model_dir is not None:
        load_tokenizer = getattr(pools.models, "load_tokenizer", None)
        save_model(merged.to("cpu"), save_model_dir, tokenizer=load_tokenizer() if load_tokenizer else None)
    return report


def _evaluate_in_rungs(tasks, model, halving: tuple[int, int], count_samples: Callable[[str, int], None],
                       with_average: Callable[[dict], dict], on_rung: Callable[[int, int, dict], None]
                       ) -> dict[str, Any]:
    """run_trial's evaluation with `halving`: rung by rung, each task's next slice of samples, merged with what came
    before (metrics are sample means), on_rung(rung, samples per task, running results) after each rung but the
    last (whose results are the trial's report: nothing is left to stop)."""
    totals: dict[str, dict[str, float]] = {}

    def slice_done(task: str, metrics: dict, _running: dict) -> None:
        totals[task] = merge_sample_means(totals.get(task), metrics)
        count_samples(task, metrics["samples"])

    start, running = 0, {}
    sizes = rung_sizes(*halving, max(tasks.sample_counts().values()))
    for rung, stop in enumerate(sizes, 1):
        tasks.evaluate(model, on_task_done=slice_done, rows=slice(start, stop))
        running = with_average({task: {key: value for key, value in merged.items() if key not in BOOKKEEPING}
                                for task, merged in totals.items()})
        if rung < len(sizes):
            on_rung(rung, stop, running)
        start = stop
    return running
