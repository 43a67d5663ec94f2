"""The Tuner of a sweep: the trainable with its resources, search algorithm, scheduler, callbacks and live table
(or the Tuner restored from `--output` on `--resume`)."""
from __future__ import annotations

import logging
from pathlib import Path

from smile_ray.spec import SweepSpec
from smile_ray.sweep.record import MODELS_DIR, OUTBOX_DIR, REPORTS_DIR, SweepOptions, experiment_path
from smile_ray.sweep.workers import smile_trial


def _search_algorithm(spec: SweepSpec):
    from ray.tune.search import BasicVariantGenerator

    search = spec.search             # max_concurrent goes to the search algorithm: Tune ignores its own limit here
    if search["algorithm"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        from ray.tune.search import ConcurrencyLimiter

        optuna = OptunaSearch(metric=search["metric"], mode=search["mode"], seed=search["seed"])
        return ConcurrencyLimiter(optuna, search["max_concurrent"]) if search["max_concurrent"] else optuna
    return BasicVariantGenerator(max_concurrent=search["max_concurrent"] or 0,      # Tune's TuneConfig limit
                                 random_state=search["seed"] if search["algorithm"] == "random" else None)


def _scheduler(spec: SweepSpec, num_tasks: int):
    """asha: rungs are tasks done (each trial reports after each task); halving: rungs are samples per task."""
    search = spec.search
    if search["scheduler"] == "halving":
        from smile_ray.sweep.halving import SampleHalving

        return SampleHalving(search["reduction_factor"], search["noise_margin"])   # metric, mode: the TuneConfig's
    if search["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=num_tasks + 1, grace_period=1, reduction_factor=2)


def _reporter(spec: SweepSpec, output: Path):
    """Tune's live table: method, its searched parameters, the running metric, tasks done, extra parameters."""
    from smile_ray.sweep.progress import SweepReporter

    from smile_ray.methods import get_method

    columns = dict.fromkeys(column for block in spec.methods for column in get_method(block["name"]).columns)
    return SweepReporter(spec.search["metric"], list(columns), output)


def build_tuner(spec: SweepSpec, pools, options: SweepOptions):
    """A new Tuner, or the restored one when resuming (Tune restores its callbacks with their state)."""
    from ray import tune

    from smile_ray.tracking import DiskSpaceGuard, MetricsCallback, MlflowSweepCallback

    trainable = tune.with_resources(
        tune.with_parameters(smile_trial, pools=pools, svd_cache=str(options.svd_cache_dir),
                             reports_dir=str(options.output / REPORTS_DIR), sweep=spec.name,
                             models_dir=str(options.output / MODELS_DIR) if spec.tracking["save_model"] else None,
                             halving=((spec.search["min_samples"], spec.search["reduction_factor"])
                                      if spec.search["scheduler"] == "halving" else None)),
        {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
    path = experiment_path(options.output)
    if options.resume and tune.Tuner.can_restore(str(path)):   # else stopped before its first trial: a new Tuner
        return tune.Tuner.restore(str(path), trainable=trainable)
    metric, mode = spec.search["metric"], spec.search["mode"]
    tracker = MlflowSweepCallback(options.tracking_uri, options.experiment, space_name=spec.name,
                                  space=spec.document, metric=metric, mode=mode, sweep_id=str(options.output),
                                  tags={"smile_ray.output": str(options.output)}, replace=options.overwrite,
                                  primary={task: s.primary for task, s in spec.task_pool.scores().items()},
                                  outbox=options.output / OUTBOX_DIR)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=_search_algorithm(spec),
                                    scheduler=_scheduler(spec, len(pools.tasks.tasks)),
                                    num_samples=spec.search["num_samples"],
                                    reuse_actors=True,       # a warm trial process keeps torch/transformers imported
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.search["max_failures"]),
                                  callbacks=[tracker, MetricsCallback(spec.name, metric, mode, final_key="report"),
                                             DiskSpaceGuard(options.output, options.min_free_mib)],
                                  progress_reporter=_reporter(spec, options.output), verbose=options.verbose),
    )


def without_restore_hint(record: logging.LogRecord) -> bool:
    """Tune's log filter: leave out its "Resume experiment with: Tuner.restore(…)" advice, for Python callers."""
    return "Tuner.restore(" not in record.getMessage()
