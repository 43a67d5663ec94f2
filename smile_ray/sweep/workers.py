"""What runs on the Ray workers of a sweep: the SVD prefill tasks and the trial function Tune calls.

Both import torch, transformers and the method when they run, on the worker: the driver never needs them for this.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from smile_ray.files import write_json


def _device() -> str:
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def prefill_expert(models, expert: str | None, plan: list[tuple[str, dict]], svd_cache: str,
                   sweep: str, check_base: bool = False, stop_file: str | None = None) -> dict[str, Any]:
    """Compute one expert's share of the sweep's SVD prefill into the cache (expert None: what is computed on the
    pretrained model alone); `plan` holds (method name, keyword arguments) pairs (`SweepSpec.prefill_plan`). Then
    read what is left of the expert's checkpoint (and of the base's, with `check_base`) when its pool streams
    weights from the files, so every weight is checked before the first trial. Runs as a Ray task; returns what it
    computed. Ends early, between its steps, once `stop_file` exists (the driver is stopping the sweep)."""
    import torch

    from smile_ray.hub import quiet_transformers
    from smile_ray.methods import get_method
    from smile_ray.metrics import SweepMetrics

    def stopping() -> bool:
        return stop_file is not None and Path(stop_file).exists()

    def result() -> dict[str, Any]:
        return {"expert": expert or "pretrained", "svd_computed": computed, "svd_seconds": seconds}

    computed, seconds = 0, 0.0
    if stopping():
        return result()
    quiet_transformers()
    torch.set_num_threads(1)
    device = _device()
    base = models.load_base()
    model = None if expert is None else models.load_expert(expert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # ranks above a layer's size are clamped: expected here
        for name, entry in plan:
            if stopping():
                return result()
            info = get_method(name).prefill.compute(base, model, svd_cache=svd_cache, device=device, **entry)
            computed, seconds = computed + info.svd_computed, seconds + info.svd_seconds
    for weights in (base if check_base else None, model):
        if getattr(weights, "lazy", False):             # CheckpointWeights; models loaded whole were checked whole
            weights.check_unread()
    if computed:
        SweepMetrics(sweep).svd_seconds(seconds)
    return result()


def _quiet_exit_during_gc(unraisable: Any, report=sys.__unraisablehook__) -> None:
    """A trial worker's unraisable-exception hook. Tune ends a trial's actor with SIGTERM, whose Ray handler raises
    SystemExit; landing inside a garbage-collection callback, Python prints it as "Exception ignored in: <WeakSet…>"
    with a traceback. The worker is exiting as asked: nothing to report. Everything else is reported as usual."""
    if not issubclass(unraisable.exc_type, SystemExit):
        report(unraisable)


def smile_trial(config: dict[str, Any], *, pools, svd_cache: str, reports_dir: str, sweep: str,
                models_dir: str | None = None, halving: tuple[int, int] | None = None) -> None:
    """One Tune trial: merge with config["method"], evaluate task by task, report after each task; with
    `models_dir` (`tracking.save_model`), also save the merged model to `models_dir/<trial id>`. With `halving`
    (min_samples, reduction_factor), evaluate in rungs of samples instead and report after each rung, with the
    score's standard error, for `SampleHalving` to stop the trial early (sweep/halving.py).

    The finished report is also written to `reports_dir/<trial id>.json`: a trial that Tune runs again after
    the driver was killed (its experiment state is saved every few seconds, not at every trial) reports that
    file instead of computing again.
    """
    import ray
    import torch
    from ray import tune

    from smile_ray.hub import quiet_transformers
    from smile_ray.metrics import SweepMetrics
    from smile_ray.report import flatten_metrics
    from smile_ray.sweep.halving import score_stderr
    from smile_ray.trial import run_trial

    if sys.unraisablehook is not _quiet_exit_during_gc:
        sys.unraisablehook = _quiet_exit_during_gc
    context = tune.get_context()
    trial_id = context.get_trial_id()
    saved = Path(reports_dir) / f"{trial_id}.json"
    reused = saved.exists()
    if reused:
        report = json.loads(saved.read_text())
    else:
        quiet_transformers()
        torch.set_num_threads(max(1, int(context.get_trial_resources().required_resources.get("CPU", 1))))
        device = _device()
        pools.tasks.device = torch.device(device)
        metrics = SweepMetrics(sweep)

        def task_done(task: str, task_metrics: dict, running: dict) -> None:
            metrics.eval_throughput(task_metrics["samples"] / max(task_metrics["seconds"], 1e-9), trial=trial_id)
            tune.report({**flatten_metrics(running), "tasks_done": len(running) - 1})

        def rung_done(rung: int, samples: int, running: dict, evaluated: dict) -> None:
            tune.report({**flatten_metrics(running), "rung": rung, "samples_per_task": samples,
                         "score_stderr": score_stderr(running, pools.primary, evaluated),
                         "timings/eval_samples": sum(evaluated.values())})

        model_dir = None if models_dir is None else Path(models_dir) / trial_id
        if model_dir is not None:
            shutil.rmtree(model_dir, ignore_errors=True)     # an earlier attempt's, if it was cut short
        report = run_trial({"method": config["method"]}, pools=pools, svd_cache=svd_cache, device=device,
                           on_task_done=task_done, save_model_dir=model_dir, halving=halving, on_rung=rung_done)
        if model_dir is not None:
            report["saved_model"] = str(model_dir)
        if report["timings"].get("svd_seconds"):
            metrics.svd_seconds(report["timings"]["svd_seconds"])
        report["model_info"].update(node_id=ray.get_runtime_context().get_node_id(), device=device)
        write_json(report, saved)
    tune.report({**flatten_metrics(report), "tasks_done": len(pools.tasks.tasks), "report": report,
                 "node_id": report["model_info"].get("node_id"), "device": report["model_info"].get("device"),
                 **({"reused_report": 1} if reused else {})})
