"""One sweep, from the checks to summary.json: `run_sweep`.

The driver's own start-up runs alongside the cluster's work: it loads its pools while a local Ray starts, and
prepares the task pool while the prefill tasks read every model and compute SVDs.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smile_ray.cluster import DEFAULT_RESOURCE_WAIT_S
from smile_ray.errors import SmileError, without_credentials
from smile_ray.files import write_json
from smile_ray.sources import check_pools
from smile_ray.spec import SweepSpec
from smile_ray.sweep.record import (OUTBOX_DIR, SUMMARY_FILE, SWEEP_FILE, SweepOptions, check_output, clear_sweep,
                                    experiment_path, refuse_existing_sweep, resumable_record, sweep_record)
from smile_ray.sweep.summary import build_summary, saved_trials, sweep_complete
from smile_ray.sweep.tuner import build_tuner, without_restore_hint
from smile_ray.sweep.workers import prefill_expert

TASK_STOP_WAIT_S = 30.0      # how long a prefill task asked to stop has to do so before it is killed

if TYPE_CHECKING:   # the driver imports torch and transformers only once a sweep starts
    from smile_ray.trial import Pools


def load_pools(spec: SweepSpec) -> Pools:
    """The driver's pools (importing torch and transformers, finding or building the models)."""
    from smile_ray.hub import quiet_transformers
    from smile_ray.trial import load_pools

    quiet_transformers()
    return load_pools(spec.model_pool, spec.task_pool)


def in_background(function: Callable[..., Any], *args: Any) -> Future:
    """Run `function(*args)` in a daemon thread; the Future gives its result or raises its error. Being a daemon,
    the thread never holds up the process: Ctrl-C or an error in the caller exits at once."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:          # handed to whoever waits on the Future
            future.set_exception(error)

    threading.Thread(target=work, name=f"smile-{function.__name__}", daemon=True).start()
    return future


def start_svd_prefill(spec: SweepSpec, models, svd_cache: Path, stop_file: Path) -> list:
    """Start filling the SVD cache for every SVD a trial of this space can slice (`SweepSpec.prefill_plan`), one Ray
    task per expert (and one on the pretrained model alone); returns the tasks' ObjectRefs (each resolves to what
    its task computed). Every expert gets a task, with nothing to compute if need be: loading a model checks its
    weights (NaN, inf), so a damaged model is refused before any trial starts, whatever the methods. A task ends
    early once `stop_file` exists (`stopped_on_error`)."""
    import ray

    jobs: dict[str | None, list[tuple[str, dict]]] = {expert: [] for expert in models.expert_names}
    for name, entry, per_expert in spec.prefill_plan():
        for expert in (models.expert_names if per_expert else [None]):
            jobs.setdefault(expert, []).append((name, entry))
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and spec.resources["gpu"] > 0 else 0
    task = ray.remote(prefill_expert).options(num_cpus=1, num_gpus=gpus, name="smile_svd_prefill")
    return [task.remote(models, expert, plan, str(svd_cache), spec.name, check_base=i == 0, stop_file=str(stop_file))
            for i, (expert, plan) in enumerate(jobs.items())]


@contextmanager
def stopped_on_error(tasks: list, stop_file: Path) -> Iterator[None]:
    """If the block raises (a task found a NaN, a dataset is unreadable, Ctrl-C), ask the tasks to stop and wait
    until they have before the error goes on: the caller may remove --output, where they write the SVD cache, and a
    task still writing there would make that fail ("Directory not empty") or leave files behind.

    They are asked through `stop_file`, which each checks between its steps, not with `ray.cancel`: a cancel that
    crosses a task's completion ends the driver itself (Ray 2.60's "Check failed: it != submissible_tasks_.end()
    Tried to complete task that was not pending", one refusal in three here). Only a task still running
    TASK_STOP_WAIT_S later (in one long SVD) is killed."""
    import ray

    try:
        yield
    except BaseException:
        if tasks:
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            try:
                running = ray.wait(tasks, num_returns=len(tasks), timeout=TASK_STOP_WAIT_S)[1]
                for task in running:
                    ray.cancel(task, force=True)
                ray.wait(running, num_returns=len(running), timeout=TASK_STOP_WAIT_S)
            finally:                                 # a second Ctrl-C too: the SVD cache may be shared
                stop_file.unlink(missing_ok=True)
        raise


def run_sweep(spec: SweepSpec, options: SweepOptions) -> dict[str, Any]:
    """Check what `--resume` continues, that every model and dataset exists and that the cluster can hold a trial
    (before anything is written), prefill the SVD cache (unless a resumed sweep's prefill had finished), run the
    sweep, write summary.json; returns the summary.

    The driver's own start-up runs alongside the cluster's work: it loads its pools while a local Ray starts,
    and prepares the task pool while the prefill tasks read every model and compute SVDs."""
    from smile_ray.cluster import check_trial_resources, ray_cluster
    from smile_ray.sweep.disk_space import check_free_space
    from smile_ray.hub import check_server

    record = resumable_record(spec, options.output) if options.resume else {}
    if not options.resume:
        refuse_existing_sweep(options.output, options.overwrite)
    check_pools(spec.model_pool, spec.task_pool)
    if "tracking_uri" in record and without_credentials(options.tracking_uri) != record["tracking_uri"]:
        options.tracking_uri = record["tracking_uri"]     # a sweep keeps the store it began with (credentials given now)
    options.experiment = record.get("experiment", options.experiment)
    if "svd_cache" in record:
        options.svd_cache = Path(record["svd_cache"])
    check_server(options.tracking_uri)
    check_output(options.output)
    check_free_space(options.output, options.min_free_mib)      # DiskSpaceGuard keeps watching
    loading = in_background(load_pools, spec)
    try:
        with ray_cluster(options.address) as dashboard:
            wait = options.resource_wait_s
            check_trial_resources(spec.resources, wait_s=(DEFAULT_RESOURCE_WAIT_S if options.address else 0.0)
                                  if wait is None else wait)
            if dashboard:
                print(dashboard, flush=True)
            if options.overwrite:
                clear_sweep(options.output)
            created = not options.output.exists()
            options.output.mkdir(parents=True, exist_ok=True)
            try:
                return sweep_on_cluster(spec, options, record, loading.result())
            except SmileError:          # found in the models while the SVDs were computed (NaN weights): a new
                if not options.resume:  # sweep leaves nothing behind, as when the checks refuse it
                    shutil.rmtree(options.output) if created else clear_sweep(options.output)
                raise
    finally:
        # never return with the loader still running: transformers swaps class attributes while it loads a model
        # (PreTrainedModel.tie_weights, torch's init functions) and puts them back afterwards, so a load running
        # alongside the caller's next one can leave them swapped for the rest of the process
        futures.wait([loading])


def sweep_on_cluster(spec: SweepSpec, options: SweepOptions, record: dict[str, Any], pools: Pools) -> dict[str, Any]:
    """The sweep once every check has passed: SVD prefill, the Tuner, summary.json."""
    import ray

    from smile_ray.mlflow_runs import absolute_sqlite_uri, find_sweep, open_store
    from smile_ray.outbox import TrackingWriter
    from smile_ray.sweep.disk_space import free_mib, output_full

    start = time.perf_counter()
    prefill = record.get("svd_prefill")                           # a resumed sweep's, if it had finished
    stop_file = options.svd_cache_dir / f".stop-prefill-{uuid.uuid4().hex[:8]}"     # this sweep's, in a shared cache
    prefill_tasks = ([] if prefill is not None
                     else start_svd_prefill(spec, pools.models, options.svd_cache_dir, stop_file))
    with stopped_on_error(prefill_tasks, stop_file):
        pools.tasks.prepare()                                     # datasets and zero-shot heads
        options.tracking_uri = absolute_sqlite_uri(options.tracking_uri)
        if "tracking_uri" not in record:              # a new sweep, or one from before sweep.json recorded it
            record = sweep_record(options, spec)
        if prefill_tasks:
            prefill = record["svd_prefill"] = ray.get(prefill_tasks)
    if prefill_tasks:
        write_json(record, options.output / SWEEP_FILE)
        if spec.prefill_plan():
            computed = sum(p["svd_computed"] for p in prefill)
            print(f"SVD cache: {computed} SVDs computed in {time.perf_counter() - start:.1f} s "
                  f"({len(prefill)} Ray tasks) → {options.svd_cache_dir}", flush=True)
    open_store(options.tracking_uri)              # once the models have been read whole: a refusal writes nothing
    logging.getLogger("ray.tune.tune").addFilter(without_restore_hint)     # main prints the command to resume
    results = build_tuner(spec, pools, options).fit()
    trials = saved_trials(experiment_path(options.output))
    if not sweep_complete(trials, spec.trial_count()):
        if free_mib(options.output) < options.min_free_mib:     # DiskSpaceGuard stopped it
            raise output_full(options.output, options.min_free_mib)
        raise KeyboardInterrupt         # Tune stopped on Ctrl-C (SIGINT) and saved its state; --resume continues
    held = TrackingWriter(options.tracking_uri, options.output / OUTBOX_DIR).held   # what the server did not take
    runs = None if held else find_sweep(options.tracking_uri, options.experiment, str(options.output))
    summary = build_summary(spec, results, runs, options, {t.trial_id: t.num_failures for t in trials})
    summary["mlflow"]["held_records"] = held
    summary["svd_prefill"] = prefill
    write_json(summary, options.output / SUMMARY_FILE)
    return summary
