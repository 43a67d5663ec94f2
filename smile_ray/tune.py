"""`python -m smile_ray.tune`: a SMILE sweep on Ray Tune, tracked in MLflow.

    python -m smile_ray.tune                                  # the embedded benchmark's space
    python -m smile_ray.tune --space clip_b32.yaml            # a shipped space (search_spaces/), or any path
    python -m smile_ray.tune --space clip_b32 --set method.gate_k=[4,16] --set task_pool.max_samples=64
    python -m smile_ray.tune --space clip_b32 --resume         # continue an interrupted sweep
    python -m smile_ray.tune --resume --output DIR            # the same, with the space stored in DIR

One sweep, in order: validate the space (before Ray starts); check that every model and dataset can be
found; fill the SVD cache of the model pool once, for the largest rank in the space, in parallel Ray
tasks; run the trials (each reports after every task, so ASHA can stop weak ones); write summary.json.
Exit status: 0 done (failed trials are listed in the summary), 2 invalid input, 1 the sweep could not run or
was interrupted (Ctrl-C: `--resume` continues it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from smile_ray.cluster import DEFAULT_RESOURCE_WAIT_S, describe_resources, keep_local_ray_on_loopback
from smile_ray.errors import SmileError, user_message
from smile_ray.files import write_json
from smile_ray.sources import check_sources
from smile_ray.spec import SweepSpec, apply_overrides, first_difference, load_space, parse_space

if TYPE_CHECKING:   # the driver imports torch and transformers only once a sweep starts
    from smile_ray.trial import Pools

SUMMARY_FILE = "summary.json"
EXPERIMENT_DIR = "tune"
SVD_CACHE_DIR = "svd_cache"
SWEEP_FILE = "sweep.json"
REPORTS_DIR = "reports"
DEFAULT_SPACE = "embedded"


# ---------------------------------------------------------------------------------------------------------------
# What runs on the workers: SVD prefill tasks and the trial function
# ---------------------------------------------------------------------------------------------------------------

def _device() -> str:
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def prefill_expert(models, expert: str | None, plan: list[tuple[str, dict]], svd_cache: str,
                   sweep: str) -> dict[str, Any]:
    """Compute one expert's share of the sweep's SVD prefill into the cache (expert None: what is computed on the
    pretrained model alone); `plan` holds (method name, keyword arguments) pairs (`SweepSpec.prefill_plan`). Runs
    as a Ray task; returns what it computed."""
    import torch

    from smile_ray.hub import quiet_transformers
    from smile_ray.methods import get_method
    from smile_ray.metrics import SweepMetrics

    quiet_transformers()
    torch.set_num_threads(1)
    device = _device()
    base = models.load_base()
    model = None if expert is None else models.load_expert(expert)
    computed, seconds = 0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # ranks above a layer's size are clamped: expected here
        for name, entry in plan:
            info = get_method(name).prefill.compute(base, model, svd_cache=svd_cache, device=device, **entry)
            computed, seconds = computed + info.svd_computed, seconds + info.svd_seconds
    if computed:
        SweepMetrics(sweep).svd_seconds(seconds)
    return {"expert": expert or "pretrained", "svd_computed": computed, "svd_seconds": seconds}


def _quiet_exit_during_gc(unraisable: Any, report=sys.__unraisablehook__) -> None:
    """A trial worker's unraisable-exception hook. Tune ends a trial's actor with SIGTERM, whose Ray handler raises
    SystemExit; landing inside a garbage-collection callback, Python prints it as "Exception ignored in: <WeakSet…>"
    with a traceback. The worker is exiting as asked: nothing to report. Everything else is reported as usual."""
    if not issubclass(unraisable.exc_type, SystemExit):
        report(unraisable)


def smile_trial(config: dict[str, Any], *, pools, svd_cache: str, reports_dir: str, sweep: str) -> None:
    """One Tune trial: merge with config["method"], evaluate task by task, report after each task.

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

        report = run_trial({"method": config["method"]}, pools=pools, svd_cache=svd_cache, device=device,
                           on_task_done=task_done)
        if report["timings"].get("svd_seconds"):
            metrics.svd_seconds(report["timings"]["svd_seconds"])
        report["model_info"].update(node_id=ray.get_runtime_context().get_node_id(), device=device)
        write_json(report, saved)
    tune.report({**flatten_metrics(report), "tasks_done": len(pools.tasks.tasks), "report": report,
                 "node_id": report["model_info"].get("node_id"), "device": report["model_info"].get("device"),
                 **({"reused_report": 1} if reused else {})})


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SweepOptions:
    output: Path
    tracking_uri: str
    experiment: str
    address: str | None = None
    resume: bool = False
    overwrite: bool = False
    resource_wait_s: float | None = None     # None: DEFAULT_RESOURCE_WAIT_S on an --address cluster, 0 locally
    verbose: int = 1


def start_svd_prefill(spec: SweepSpec, models, svd_cache: Path) -> list:
    """Start filling the SVD cache for every SVD a trial of this space can slice (`SweepSpec.prefill_plan`), one Ray
    task per expert (and one on the pretrained model alone); returns the tasks' ObjectRefs (each resolves to what
    its task computed)."""
    import ray

    jobs: dict[str | None, list[tuple[str, dict]]] = {}
    for name, entry, per_expert in spec.prefill_plan():
        for expert in (models.expert_names if per_expert else [None]):
            jobs.setdefault(expert, []).append((name, entry))
    if not jobs:
        return []
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and spec.resources["gpu"] > 0 else 0
    task = ray.remote(prefill_expert).options(num_cpus=1, num_gpus=gpus, name="smile_svd_prefill")
    return [task.remote(models, expert, plan, str(svd_cache), spec.name) for expert, plan in jobs.items()]


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
    if spec.search["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=num_tasks + 1, grace_period=1, reduction_factor=2)


def _reporter(spec: SweepSpec, output: Path):
    """Tune's live table: method, its searched parameters, the running metric, tasks done, extra parameters."""
    from smile_ray.progress import SweepReporter

    from smile_ray.methods import get_method

    columns = dict.fromkeys(column for block in spec.methods for column in get_method(block["name"]).columns)
    return SweepReporter(spec.search["metric"], list(columns), output)


def build_tuner(spec: SweepSpec, pools, options: SweepOptions):
    """A new Tuner, or the restored one when resuming (Tune restores its callbacks with their state)."""
    from ray import tune

    from smile_ray.tracking import MetricsCallback, MlflowSweepCallback

    trainable = tune.with_resources(
        tune.with_parameters(smile_trial, pools=pools, svd_cache=str(options.output / SVD_CACHE_DIR),
                             reports_dir=str(options.output / REPORTS_DIR), sweep=spec.name),
        {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
    path = str(options.output / EXPERIMENT_DIR)
    if options.resume:                                   # run_sweep checked that there is one
        return tune.Tuner.restore(path, trainable=trainable)
    metric, mode = spec.search["metric"], spec.search["mode"]
    tracker = MlflowSweepCallback(options.tracking_uri, options.experiment, space_name=spec.name,
                                  space=spec.document, metric=metric, mode=mode, sweep_id=str(options.output),
                                  tags={"smile_ray.output": str(options.output)}, replace=options.overwrite)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=_search_algorithm(spec),
                                    scheduler=_scheduler(spec, len(pools.tasks.tasks)),
                                    num_samples=spec.search["num_samples"],
                                    reuse_actors=True,       # a warm trial process keeps torch/transformers imported
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name=EXPERIMENT_DIR, storage_path=str(options.output),
                                  failure_config=tune.FailureConfig(max_failures=spec.search["max_failures"]),
                                  callbacks=[tracker, MetricsCallback(spec.name, metric, mode, final_key="report")],
                                  progress_reporter=_reporter(spec, options.output), verbose=options.verbose),
    )


def _scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A trial's final values for summary.json: metrics and short strings (node_id, device), no bookkeeping."""
    from smile_ray.tracking import is_bookkeeping

    return {k: v for k, v in result.items() if not is_bookkeeping(k) and isinstance(v, (int, float, str, bool))}


def build_summary(spec: SweepSpec, results, runs, options: SweepOptions) -> dict[str, Any]:
    """summary.json: every trial (id, status, method config, final metrics, MLflow run) and the best one."""
    from smile_ray.plots import best_point

    metric, mode = spec.search["metric"], spec.search["mode"]
    trials = []
    for result in results:
        # every result carries its trial id; a trial that failed before reporting has only its directory name
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        metrics = _scalar_metrics(result.metrics or {})
        status = "error" if result.error is not None else (
            "finished" if "report" in (result.metrics or {}) else "stopped")   # stopped early by the scheduler
        trials.append({"trial_id": trial_id, "status": status, "config": result.config.get("method", {}),
                       "metrics": metrics, "mlflow_run_id": runs.run_ids.get(trial_id) if runs else None,
                       "error": None if result.error is None else user_message(result.error)[:500]})
    return {"space": spec.name, "metric": metric, "mode": mode, "trials": trials,
            "best": best_point([t for t in trials if t["status"] == "finished"], metric, mode),
            "mlflow": {"tracking_uri": options.tracking_uri, "experiment": options.experiment,
                       "experiment_id": runs.experiment_id if runs else None,
                       "parent_run_id": runs.parent_run_id if runs else None}}


def _status(trial: dict[str, Any]) -> str:
    """A trial's status; one stopped early says after how many tasks (its score is their running average)."""
    done = trial["metrics"].get("tasks_done")
    return f"stopped after {int(done)} task(s)" if trial["status"] == "stopped" and done else trial["status"]


def ranked_table(summary: dict[str, Any], limit: int = 25) -> str:
    """The trials, best first: method, what tells its configuration apart (its MLflow run name), the metric,
    extra parameters and status."""
    from smile_ray.methods import describe

    metric = summary["metric"]
    rows = sorted(summary["trials"], key=lambda t: (t["status"] != "finished",
                                                    -(t["metrics"].get(metric) or 0) if summary["mode"] == "max"
                                                    else (t["metrics"].get(metric) or 0)))
    lines = [f"{'#':>3}  {'method':<16}  {'configuration':<20}{metric:>18}{'extra params':>15}  status"]
    for rank, t in enumerate(rows[:limit], 1):
        name, score, extra = t["config"].get("name", ""), t["metrics"].get(metric), t["metrics"].get(
            "model_info/extra_params")
        configuration = describe(t["config"]).removeprefix(str(name)).strip()
        score = (f"{100 * score:.2f}%" if isinstance(score, float) and metric.endswith(("accuracy", "score"))
                 else str(score or ""))
        lines.append(f"{rank:>3}  {name:<16}  {configuration:<20}{score:>18}"
                     f"{'' if extra is None else f'{int(extra):,}':>15}  {_status(t)}")
    if len(rows) > limit:
        lines.append(f"… {len(rows) - limit} more in summary.json")
    return "\n".join(lines)


def read_record(output: Path) -> dict[str, Any]:
    """sweep.json: what a sweep fixed when it started (tracking store, experiment, space) and, once its SVD prefill
    has finished, what the prefill computed. Empty when there is none."""
    record = output / SWEEP_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def sweep_record(options: SweepOptions, spec: SweepSpec) -> dict[str, Any]:
    """Write sweep.json for a sweep that starts: its tracking store, experiment, space and place, which a
    `--resume` keeps; returns what it wrote."""
    record = {"tracking_uri": options.tracking_uri, "experiment": options.experiment, "space_name": spec.name,
              "space": space_text(spec), "output": str(options.output)}
    write_json(record, options.output / SWEEP_FILE)
    return record


def space_text(spec: SweepSpec) -> str:
    """The space as given (after --set), as YAML: what sweep.json keeps (any YAML value survives, dates and .nan
    included) and what --resume compares."""
    return yaml.safe_dump(spec.document, sort_keys=False)


def resume_space(output: Path, overrides: list[str]) -> SweepSpec | None:
    """On `--resume` without `--space`: the space the sweep in `output` started with (then `--set`); None for no
    sweep there (or one from a version that did not record it)."""
    record = read_record(output)
    if not isinstance(record.get("space"), str):
        return None
    return parse_space(apply_overrides(yaml.safe_load(record["space"]), overrides), record["space_name"])


def resumable_record(spec: SweepSpec, output: Path) -> dict[str, Any]:
    """sweep.json of the sweep in `output`, which `--resume` continues, after checking that there is one, that it
    was started there and with this space (else Tune would restore the old trials and silently ignore what
    changed)."""
    from ray import tune

    if not tune.Tuner.can_restore(str(output / EXPERIMENT_DIR)):
        raise SmileError(f"--resume: no sweep to resume in {output / EXPERIMENT_DIR}")
    record = read_record(output)
    started_in = record.get("output")
    if started_in is not None and Path(started_in).resolve() != output.resolve():
        raise SmileError(f"--resume: the sweep in {output} was started in {started_in} and copied or moved since; its "
                         f"MLflow records and Tune state point there: resume it there")
    stored = record.get("space")
    if isinstance(stored, str) and stored != space_text(spec):
        changed = first_difference(yaml.safe_load(stored), spec.document) or "a value"
        raise SmileError(f"--resume: the space differs at {changed} from the one the sweep in {output} started with; "
                         f"leave out --space and --set to resume it as it was, or start a new --output")
    return record


def check_output(output: Path) -> None:
    """--output can be created and written, checked without creating it (nothing is written before every check
    has passed)."""
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise SmileError(f"--output {output}: cannot create ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SmileError(f"--output {output}: not writable ({existing})")


SWEEP_PARTS = (EXPERIMENT_DIR, REPORTS_DIR, SWEEP_FILE, SUMMARY_FILE)     # what --overwrite removes (not the cache)


def refuse_existing_sweep(output: Path, overwrite: bool) -> None:
    """A new sweep does not silently replace the one in --output: that one is continued with --resume, or started
    over with --overwrite."""
    if overwrite or not any((output / part).exists() for part in SWEEP_PARTS):
        return
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(min((output / p).stat().st_mtime for p in SWEEP_PARTS
                                                                 if (output / p).exists())))
    raise SmileError(f"--output {output} holds a sweep already (started {started}): continue it with --resume, "
                     f"start it over with --overwrite, or choose another --output")


def clear_sweep(output: Path) -> None:
    """--overwrite: remove the previous sweep's Tune state, reports, record and summary (the SVD cache and the
    MLflow store stay; the previous sweep's MLflow runs are deleted when the new one starts)."""
    for part in SWEEP_PARTS:
        path = output / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def load_pools(spec: SweepSpec) -> Pools:
    """The driver's pools (importing torch and transformers, finding or building the models)."""
    from smile_ray.hub import quiet_transformers
    from smile_ray.trial import load_pools

    quiet_transformers()
    return load_pools(spec.model_pool, spec.task_pool)


def without_restore_hint(record: logging.LogRecord) -> bool:
    """Tune's log filter: leave out its "Resume experiment with: Tuner.restore(…)" advice, for Python callers."""
    return "Tuner.restore(" not in record.getMessage()


def sweep_complete(experiment: Path, trial_count: int) -> bool:
    """Whether the experiment Tune saved in `experiment` has run all `trial_count` trials to an end (finished,
    stopped early by the scheduler, or failed). After Ctrl-C Tune returns normally and marks the trials it stopped
    TERMINATED in memory, but saves them as PENDING, for a restore to run again: the saved state tells."""
    from ray.tune import ExperimentAnalysis

    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)          # "could not fetch metrics" of trials stopped before reporting
    try:
        trials = ExperimentAnalysis(str(experiment)).trials
    finally:
        analysis_log.setLevel(level)
    return len(trials) >= trial_count and all(trial.status in ("TERMINATED", "ERROR") for trial in trials)


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


def run_sweep(spec: SweepSpec, options: SweepOptions) -> dict[str, Any]:
    """Check what `--resume` continues, that every model and dataset exists and that the cluster can hold a trial
    (before anything is written), prefill the SVD cache (unless a resumed sweep's prefill had finished), run the
    sweep, write summary.json; returns the summary.

    The driver's own start-up runs alongside the cluster's work: it loads its pools while a local Ray starts,
    and prepares the task pool and opens the MLflow store while the prefill tasks compute SVDs."""
    from smile_ray.cluster import check_trial_resources, ray_cluster
    from smile_ray.hub import check_server

    record = resumable_record(spec, options.output) if options.resume else {}
    if not options.resume:
        refuse_existing_sweep(options.output, options.overwrite)
    check_sources(spec.model_pool.sources() + spec.task_pool.sources())
    options.tracking_uri = record.get("tracking_uri", options.tracking_uri)    # a sweep keeps the store it began with
    options.experiment = record.get("experiment", options.experiment)
    check_server(options.tracking_uri)
    check_output(options.output)
    loading = in_background(load_pools, spec)
    with ray_cluster(options.address) as dashboard:
        wait = options.resource_wait_s
        check_trial_resources(spec.resources, wait_s=(DEFAULT_RESOURCE_WAIT_S if options.address else 0.0)
                              if wait is None else wait)
        if dashboard:
            print(dashboard, flush=True)
        if options.overwrite:
            clear_sweep(options.output)
        options.output.mkdir(parents=True, exist_ok=True)
        return sweep_on_cluster(spec, options, record, loading.result())


def sweep_on_cluster(spec: SweepSpec, options: SweepOptions, record: dict[str, Any], pools: Pools) -> dict[str, Any]:
    """The sweep once every check has passed: SVD prefill, the Tuner, summary.json."""
    import ray

    from smile_ray.tracking import absolute_sqlite_uri, find_sweep, open_store

    start = time.perf_counter()
    prefill = record.get("svd_prefill")                           # a resumed sweep's, if it had finished
    prefill_tasks = None if prefill is not None else start_svd_prefill(spec, pools.models,
                                                                       options.output / SVD_CACHE_DIR)
    pools.tasks.prepare()                                         # datasets and zero-shot heads
    options.tracking_uri = absolute_sqlite_uri(options.tracking_uri)
    if "tracking_uri" not in record:                  # a new sweep, or one from before sweep.json recorded it
        record = sweep_record(options, spec)
    open_store(options.tracking_uri)
    if prefill_tasks is not None:
        prefill = record["svd_prefill"] = ray.get(prefill_tasks)
        write_json(record, options.output / SWEEP_FILE)
        if prefill:
            computed = sum(p["svd_computed"] for p in prefill)
            print(f"SVD cache: {computed} SVDs computed in {time.perf_counter() - start:.1f} s "
                  f"({len(prefill)} Ray tasks) → {options.output / SVD_CACHE_DIR}", flush=True)
    logging.getLogger("ray.tune.tune").addFilter(without_restore_hint)     # main prints the command to resume
    results = build_tuner(spec, pools, options).fit()
    if not sweep_complete(options.output / EXPERIMENT_DIR, spec.trial_count()):
        raise KeyboardInterrupt         # Tune stopped on Ctrl-C (SIGINT) and saved its state; --resume continues
    runs = find_sweep(options.tracking_uri, options.experiment, str(options.output))
    summary = build_summary(spec, results, runs, options)
    summary["svd_prefill"] = prefill
    write_json(summary, options.output / SUMMARY_FILE)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smile_ray.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help="a space YAML, or a name in search_spaces/ (default: embedded; with --resume, "
                                         "the space the sweep in --output started with)")
    parser.add_argument("--output", help="trial storage, SVD cache and summary.json (default: ./smile_runs/<space>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space with a YAML value, e.g. --set method.gate_k=[4,16]; "
                             "method[3].k=-1 sets entry 3 of a list")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the sweep stored in --output")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in an --output that holds a sweep (its Tune state, reports and MLflow runs "
                            "are replaced; the SVD cache is kept)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--wait-for-resources", type=float, metavar="SECONDS",
                        help="how long to wait for a node that fits a trial's resources to join an --address cluster "
                             f"(default {DEFAULT_RESOURCE_WAIT_S:g}; a local Ray is checked at once)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --output)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: the space's tracking.experiment)")
    parser.add_argument("--validate", action="store_true", help="only validate the space and print its trials")
    return parser.parse_args(argv)


def describe(spec: SweepSpec) -> str:
    """What --validate prints: the trial count, the SVD prefill, and every configuration (the parameters that are
    searched or differ from the method's defaults; a sampled one shows its distribution)."""
    from smile_ray.methods import describe as describe_method
    from smile_ray.methods import get_method
    from smile_ray.spec import Sampled

    plan = ", ".join(describe_method({"name": name, **entry}) + ("" if per_expert else " (pretrained only)")
                     for name, entry, per_expert in spec.prefill_plan()) or "none"
    count, samples = spec.trial_count(), spec.search["num_samples"]
    lines = [f"{spec.name}: valid; {count} trial{'s' * (count != 1)} ({spec.search['algorithm']} search"
             f"{f', num_samples {samples}' if samples != 1 else ''}); SVD prefill: {plan}; "
             f"{describe_resources(spec.resources)} (checked against the cluster when the sweep starts)"]
    searched = {(block["name"], key) for block in spec.methods for key, v in block.items() if isinstance(v, Sampled)}
    for point in spec.methods if spec.searched else spec.grid_points():
        defaults = {p.name: p.default for p in get_method(point["name"]).params}
        shown = [f"{key}={f'{value.kind}{list(value.args)}' if isinstance(value, Sampled) else value}"
                 for key, value in point.items()
                 if key != "name" and ((point["name"], key) in searched or value != defaults.get(key))]
        lines.append(f"  {point['name']:<16} {' '.join(shown)}".rstrip())
    return "\n".join(lines)


def sweep_space(args: argparse.Namespace) -> SweepSpec:
    """--space; else, on --resume, the space the sweep in --output started with; else the embedded benchmark's."""
    if args.space is None and args.resume:
        spec = resume_space(Path(args.output or Path("smile_runs") / DEFAULT_SPACE), args.overrides)
        if spec is not None:
            return spec
    return load_space(args.space or DEFAULT_SPACE, args.overrides)


def mlflow_hint(tracking_uri: str, experiment: str) -> str:
    """How to open the sweep in the MLflow UI, as a command that works when pasted (this environment's mlflow,
    which a venv need not have put on PATH)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {tracking_uri}  (experiment {experiment})"
    beside = Path(sys.executable).parent / "mlflow"
    command = shlex.quote(str(beside)) if beside.is_file() else f"{shlex.quote(sys.executable)} -m mlflow"
    return (f"MLflow: {command} ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000  "
            f"(then http://127.0.0.1:5000, experiment {experiment})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")          # Tune's table reporter, with our columns
    if args.address is None:
        keep_local_ray_on_loopback()                           # before anything imports ray
    output = None
    try:
        spec = sweep_space(args)
        if args.validate:
            print(describe(spec))
            return 0
        output = Path(args.output or Path("smile_runs") / spec.name).resolve()
        tracking_uri = args.tracking_uri or f"sqlite:///{output / 'mlflow.db'}"
        options = SweepOptions(output=output, tracking_uri=tracking_uri, address=args.address, resume=args.resume,
                               overwrite=args.overwrite, resource_wait_s=args.wait_for_resources,
                               experiment=args.experiment or spec.tracking["experiment"])
        summary = run_sweep(spec, options)
    except SmileError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ray import tune

        if output is not None and tune.Tuner.can_restore(str(output / EXPERIMENT_DIR)):
            print(f"interrupted; the finished trials are kept, continue with: python -m smile_ray.tune --resume "
                  f"--output {output}", file=sys.stderr)
        else:
            print("interrupted before any trial started; run the same command again", file=sys.stderr)
        return 1
    except Exception as error:   # the sweep itself could not run (Ray, storage, MLflow): one line, status 1
        print(f"error: the sweep could not run: {type(error).__name__}: {user_message(error)}", file=sys.stderr)
        return 1
    print("\n" + ranked_table(summary))
    failed = sum(t["status"] == "error" for t in summary["trials"])
    print(f"\n{len(summary['trials'])} trials ({failed} failed); summary: {options.output / SUMMARY_FILE}")
    print(mlflow_hint(options.tracking_uri, options.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
