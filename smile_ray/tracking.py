"""What the driver records about a sweep, through Ray Tune callbacks: MLflow runs (`MlflowSweepCallback`) and the
sweep-level Ray metrics of `smile_ray.metrics` (`MetricsCallback`: trials ended, best score so far); and
`DiskSpaceGuard`, which stops a sweep whose --output is filling up (smile_ray.sweep.disk_space).

Layout: one parent run per sweep (the space as `space.yaml`, best-trial metrics, plots) and one child run per trial
(tag `mlflow.parentRunId`; params = the flattened trial config; every numeric result as a metric at step
`training_iteration`; `report.json` and the `per_task.json` table at the end). Trial processes never talk to MLflow,
so a sqlite store is safe and multi-node sweeps need no tracking server reachable from the workers.

Every write goes through `smile_ray.outbox.TrackingWriter`: while an http(s) tracking server does not answer, the
writes are held on disk in `outbox` and delivered, in order and once, when it answers again.

Resume: `get_state`/`set_state` keep the parent run, the trial → child run map and the finished trials, so after
`Tuner.restore` the parent is reused and a finished trial never gets a second child. The child map is also looked up
in MLflow (tag `trial_id` under the parent), which covers trials started after Tune's last state snapshot.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from ray import tune

from smile_ray.errors import SmileError, last_line, without_credentials
from smile_ray.metrics import SweepMetrics
from smile_ray.mlflow_runs import (EXPERIMENT_KIND_TAG, MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_TAG_LENGTH,
                                   MODEL_TRAINING, SweepRuns, absolute_sqlite_uri, children_of,
                                   default_artifact_location, flatten_config, git_commit, metric_key, number,
                                   param_value, plain, ray_job_id, result_metrics, run_name)
from smile_ray.outbox import TrackingWriter
from smile_ray.plots import best_point, plot_routing, sweep_figures
from smile_ray.report import flatten_metrics, task_names
from smile_ray.sweep.disk_space import free_mib

logger = logging.getLogger(__name__)


def _trial_error(trial: Any) -> str | None:
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None
    return None


class MlflowSweepCallback(tune.Callback):
    """Ray Tune callback that records a sweep in MLflow from the driver (see the module docstring).

    What it reads from Tune: `trial.trial_id`, `trial.config` (nested; `method.name`, `method.gate_k`, `method.k`
    drive the plots), each result's numeric entries, and the last result's `report` (the FusionBench report dict) when
    the trial completes. `strict=False` turns MLflow errors inside trial hooks into warnings, so a tracking hiccup
    does not end a long sweep; setup errors always propagate.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, space_name: str, space: Mapping[str, Any],
                 metric: str = "average/accuracy", mode: str = "max", tags: Mapping[str, str] | None = None,
                 artifact_location: str | None = None, sweep_id: str | None = None, strict: bool = False,
                 replace: bool = False, primary: Mapping[str, str] | None = None,
                 outbox: str | os.PathLike | None = None) -> None:
        if mode not in ("max", "min"):
            raise SmileError(f"mode: expected 'max' or 'min', got {mode!r}")
        if sweep_id is not None and re.search(r"['\"`\\]", sweep_id):
            raise SmileError(f"sweep_id: quotes and backslashes are not allowed, got {sweep_id!r}")
        self.tracking_uri = absolute_sqlite_uri(tracking_uri)
        self.experiment = experiment
        self.space_name = space_name
        self.space = dict(space)
        self.metric = metric
        self.mode = mode
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.artifact_location = artifact_location or default_artifact_location(self.tracking_uri)
        self.sweep_id = sweep_id or uuid.uuid4().hex
        self.strict = strict
        self.replace = replace                        # delete earlier runs of this sweep_id (--overwrite)
        self.primary = dict(primary or {})            # task → its score's metric, for the per-task plot of a score
        self.outbox = None if outbox is None else str(outbox)     # where writes wait for a server that is away
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.run_ids: dict[str, str] = {}
        self.finished: set[str] = set()             # trials whose child run is complete (report logged)
        self.ended: set[str] = set()                # trials Tune completed or failed (not those a Ctrl-C stopped)
        self.resumed = False
        self.recoveries: dict[str, int] = {}          # trial → attempts Tune retried (FailureConfig.max_failures)
        self.errors: dict[str, str] = {}              # trial → the error line its child run is tagged with
        self.total_trials: int | None = None          # how many trials the search will create (Tune tells setup)
        self._client: MlflowClient | None = None
        self._writer: TrackingWriter | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = state["_writer"] = None     # Tune pickles callbacks into tuner.pkl
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def writer(self) -> TrackingWriter:
        """Where the callback's writes go (reads use `client`)."""
        if self._writer is None:
            self._writer = TrackingWriter(self.tracking_uri, getattr(self, "outbox", None))
        return self._writer

    @property
    def sweep(self) -> SweepRuns | None:
        """The sweep's MLflow ids, once `setup` ran."""
        if self.experiment_id is None or self.parent_run_id is None:
            return None
        return SweepRuns(self.experiment_id, self.parent_run_id,
                         {trial: self.writer.resolve(run) for trial, run in self.run_ids.items()})

    # -- state -----------------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"version": 1, "sweep_id": self.sweep_id, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "run_ids": dict(self.run_ids),
                "finished": sorted(self.finished), "ended": sorted(self.ended),
                "recoveries": dict(self.recoveries), "errors": dict(self.errors)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.sweep_id = state.get("sweep_id", self.sweep_id)
        self.experiment_id = state.get("experiment_id")
        self.parent_run_id = state.get("parent_run_id")
        self.run_ids = dict(state.get("run_ids", {}))
        self.finished = set(state.get("finished", ()))
        self.ended = set(state.get("ended", self.finished))
        self.recoveries = dict(state.get("recoveries", {}))
        self.errors = dict(state.get("errors", {}))
        self.resumed = self.parent_run_id is not None

    # -- experiment ------------------------------------------------------------------------------------------------

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        """Get or create the experiment; create the parent run, or reopen it after a restore (first delivering what
        an earlier run of the sweep held for the server)."""
        self.total_trials = total_num_samples
        self.writer.deliver()
        if self.parent_run_id is not None and self._reopen_parent():
            return
        self.experiment_id = self._experiment_id()
        if self.replace:
            self._delete_earlier_sweeps()
        tags = {"smile_ray.space": self.space_name, "smile_ray.sweep_id": self.sweep_id, **self.tags}
        commit, job = git_commit(), ray_job_id()
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        if job:
            tags["ray.job_id"] = job
        run = self.client.create_run(self.experiment_id, run_name=f"sweep {self.space_name}", tags=tags)
        self.parent_run_id = run.info.run_id
        self.run_ids, self.finished, self.ended, self.resumed = {}, set(), set(), False
        self.writer.log_dict(self.parent_run_id, plain(self.space), "space.yaml")

    def _experiment_id(self) -> str:
        """The experiment, created if needed, marked as model training so that the MLflow UI opens on its runs
        (MLflow 3 opens an unmarked experiment in its GenAI traces view)."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if found.lifecycle_stage != "active":
            raise SmileError(f"MLflow experiment {self.experiment!r} is deleted: restore it or choose another name")
        if EXPERIMENT_KIND_TAG not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return found.experiment_id

    def _delete_earlier_sweeps(self) -> None:
        """Delete (MLflow's soft delete: `mlflow gc` purges, the UI can restore) the parent runs tagged with this
        sweep_id and their children."""
        parents = self.client.search_runs([self.experiment_id],
                                          filter_string=f"tags.`smile_ray.sweep_id` = '{self.sweep_id}'")
        for parent in parents:
            for run_id in children_of(self.client, self.experiment_id, parent.info.run_id).values():
                self.client.delete_run(run_id)
            self.client.delete_run(parent.info.run_id)

    def _reopen_parent(self) -> bool:
        try:
            parent = self.client.get_run(self.parent_run_id)
        except MlflowException:
            logger.warning("MLflow parent run %s is gone; starting a new one", self.parent_run_id)
            return False
        self.experiment_id = parent.info.experiment_id
        self.writer.update_run(self.parent_run_id, status="RUNNING")
        resumes = int(parent.data.tags.get("smile_ray.resumes", "0")) + 1
        tags = {"smile_ray.resumes": str(resumes)}
        job = ray_job_id()
        if job:
            tags["ray.job_id"] = job
        self._set_tags(self.parent_run_id, tags)
        self.resumed = True
        return True

    # -- trials ----------------------------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard(f"trial {trial.trial_id} start", self._open_child, trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard(f"trial {trial.trial_id} recover", self._recover, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._guard(f"trial {trial.trial_id} result", self._log_result, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(str(trial.trial_id))
        self._guard(f"trial {trial.trial_id} complete", self._complete, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(str(trial.trial_id))
        self._guard(f"trial {trial.trial_id} error", self._fail, trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._guard("held records", self.writer.deliver_if_due)

    def _guard(self, what: str, hook: Callable[..., Any], *args: Any) -> None:
        """Run `hook`; unless strict, an MLflow or I/O error becomes a one-line warning."""
        if self.strict:
            hook(*args)
            return
        try:
            hook(*args)
        except (MlflowException, OSError, ValueError) as error:
            logger.warning("MLflow tracking (%s) failed: %s", what, without_credentials(last_line(str(error))))

    def _open_child(self, trial: Any) -> str:
        """The trial's child run, created on first sight, else reopened (RUNNING)."""
        trial_id = str(trial.trial_id)
        run_id = self.run_ids.get(trial_id)
        if run_id is None and self.resumed and not self.writer.holding:   # held: the delivery finds an existing child
            run_id = children_of(self.client, self.experiment_id, self.parent_run_id, trial_id).get(trial_id)
        if run_id is not None:
            self.run_ids[trial_id] = run_id
            self._reopen(trial_id, run_id)
            return run_id
        config = dict(trial.config or {})
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial_id, "trial_name": str(trial),
                "smile_ray.space": self.space_name}
        method = config.get("method")
        if isinstance(method, Mapping) and "name" in method:
            tags["smile_ray.method"] = str(method["name"])
        name = run_name(config, trial_id)
        run_id = self.writer.create_run(self.experiment_id, run_name=name, tags=tags)
        self.run_ids[trial_id] = run_id
        params = {}
        for key, value in flatten_config(config).items():
            valid = metric_key(key)
            if valid is not None:
                params[valid] = param_value(value)
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.writer.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])
        self.writer.log_dict(run_id, plain(config), "config.yaml")
        return run_id

    def _reopen(self, trial_id: str, run_id: str) -> None:
        """Back to RUNNING; an error from an earlier attempt moves to `smile_ray.previous_error`."""
        error = self.errors.pop(trial_id, None)
        if error is not None:
            self._set_tags(run_id, {"smile_ray.previous_error": error})
            self.writer.delete_tag(run_id, "smile_ray.error")
        self.writer.update_run(run_id, status="RUNNING")

    def _recover(self, trial: Any) -> None:
        """A failed attempt that Tune retries (FailureConfig.max_failures): count it, keep its error line."""
        run_id = self._child(trial)
        count = self.recoveries[str(trial.trial_id)] = self.recoveries.get(str(trial.trial_id), 0) + 1
        tags = {"smile_ray.recoveries": str(count)}
        text = _trial_error(trial)
        if text:
            tags["smile_ray.previous_error"] = last_line(text)
        self._set_tags(run_id, tags)

    def _child(self, trial: Any) -> str:
        run_id = self.run_ids.get(str(trial.trial_id))
        return run_id if run_id is not None else self._open_child(trial)

    def _log_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        run_id = self._child(trial)
        self.log_metrics(run_id, result_metrics(result), step=int(result.get("training_iteration") or 0))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """All of `metrics` at `step`, in `log_batch` calls of at most 1000 metrics."""
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            valid = metric_key(key)
            if valid is not None:
                items.append(Metric(valid, float(value), now, step))
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.writer.log_batch(run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])

    def _complete(self, trial: Any) -> None:
        trial_id = str(trial.trial_id)
        run_id = self._child(trial)
        report = (trial.last_result or {}).get("report")
        if isinstance(report, Mapping):
            self.writer.log_dict(run_id, plain(report), "report.json")
            tasks = task_names(report)
            if tasks and trial_id not in self.finished:       # log_table appends: only once per run
                metrics = list(dict.fromkeys(metric for task in tasks for metric in report[task]))
                self.writer.log_table(run_id, data={
                    "task": tasks, **{metric: [number(report[task].get(metric)) for task in tasks]
                                      for metric in metrics}}, artifact_file="per_task.json")
            if isinstance(report.get("routing"), Mapping) and trial_id not in self.finished:
                self._log_routing(run_id, report["routing"])
            self._set_tags(run_id, {"smile_ray.stopped_early": "false",
                                    **({"smile_ray.saved_model": str(report["saved_model"])}
                                       if report.get("saved_model") else {})})
        else:
            self._set_tags(run_id, {"smile_ray.stopped_early": "true"})
        self.writer.set_terminated(run_id, status="FINISHED")
        self.finished.add(trial_id)

    def _log_routing(self, run_id: str, routing: Mapping[str, Any]) -> None:
        """A SMILE trial's routing: a table (task, layer, expert, share) to compare across runs, and its plot."""
        rows = [(task, layer, expert, share) for task, layers in routing["tasks"].items()
                for layer, shares in layers.items() for expert, share in zip(routing["experts"], shares)]
        self.writer.log_table(run_id, data={key: [row[i] for row in rows] for i, key in
                                            enumerate(("task", "layer", "expert", "share"))},
                              artifact_file="routing.json")
        figure = plot_routing(routing)
        self.writer.log_figure(run_id, figure, "routing.png")
        figure.clear()

    def _fail(self, trial: Any) -> None:
        run_id = self._child(trial)
        text = _trial_error(trial)
        if text:
            self.errors[str(trial.trial_id)] = last_line(text)[:MAX_TAG_LENGTH]
            self._set_tags(run_id, {"smile_ray.error": self.errors[str(trial.trial_id)]})
            self.writer.log_text(run_id, text, "error.txt")
        self.writer.set_terminated(run_id, status="FAILED")

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.writer.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()])

    # -- end -------------------------------------------------------------------------------------------------------

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Best trial and plots on the parent, from the trials that ended; parent FINISHED, FAILED (every trial
        failed) or KILLED (interrupted: trials left unfinished or not yet created, which a restore resumes).

        Tune marks the trials a Ctrl-C stopped TERMINATED without completing them, so "ended" is what this callback
        saw complete or fail, not the trial's status."""
        if self.parent_run_id is None:
            return
        ended = [t for t in trials if str(t.trial_id) in self.ended or t.status == "ERROR"]
        points = sweep_points(ended)
        self._guard("best trial", self._log_best, points, len(ended))
        self._guard("plots", self._log_plots, points)
        unfinished = [t for t in trials if t not in ended]
        for trial in unfinished:
            if str(trial.trial_id) in self.run_ids:
                self._guard(f"trial {trial.trial_id} end", self.writer.set_terminated,
                            self.run_ids[str(trial.trial_id)], "KILLED")
        if unfinished or len(trials) < (self.total_trials or 0):
            status = "KILLED"
        elif trials and all(t.status == "ERROR" for t in trials):
            status = "FAILED"
        else:
            status = "FINISHED"
        self._guard("parent end", self.writer.set_terminated, self.parent_run_id, status)
        self._guard("held records", self._deliver_held)

    def _deliver_held(self) -> None:
        if not self.writer.deliver():
            logger.warning("MLflow tracking server %s did not answer: %d records held in %s",
                           without_credentials(self.tracking_uri), self.writer.held, self.outbox)

    def _log_best(self, points: list[dict[str, Any]], done: int) -> None:
        best = best_point(points, self.metric, self.mode)
        if best is None:
            return
        self.log_metrics(self.parent_run_id, {f"best/{key}": value for key, value in best["metrics"].items()},
                         step=done)
        tags = {"best.trial_id": best["trial_id"],
                "best.run_id": self.writer.resolve(self.run_ids.get(best["trial_id"], ""))}
        tags.update({f"best.{key}": param_value(value) for key, value in best["config"].items()
                     if metric_key(f"best.{key}") is not None})
        self._set_tags(self.parent_run_id, tags)
        self.writer.log_dict(self.parent_run_id, {"trial_id": best["trial_id"], "run_id": tags["best.run_id"],
                                                  "metric": self.metric, "mode": self.mode,
                                                  "value": best["metrics"][self.metric],
                                                  "config": plain(best["config"])}, "best_config.json")

    def _log_plots(self, points: list[dict[str, Any]]) -> None:
        for path, figure in sweep_figures(points, self.metric, self.mode, getattr(self, "primary", None)).items():
            self.writer.log_figure(self.parent_run_id, figure, path)
            figure.clear()


def sweep_points(trials: Iterable[Any]) -> list[dict[str, Any]]:
    """Plain-dict view of the finished (TERMINATED) trials for `smile_ray.plots`: metrics are the last result's,
    completed by the flattened report (all tasks, model_info, timings) when the trial carries one."""
    points = []
    for trial in trials:
        if trial.status != "TERMINATED":
            continue
        result = trial.last_result or {}
        report = result.get("report") if isinstance(result.get("report"), Mapping) else None
        metrics = {**result_metrics(result), **(flatten_metrics(report) if report else {})}
        points.append({"trial_id": str(trial.trial_id), "config": flatten_config(trial.config or {}),
                       "metrics": metrics, "report": report})
    return points


def _lookup(result: dict[str, Any], metric: str) -> Any:
    """result[metric], or the nested value for "a/b" when the result is not flattened."""
    if metric in result:
        return result[metric]
    value: Any = result
    for part in metric.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class MetricsCallback(tune.Callback):
    """Tune callback (runs on the driver): counts trials that ended and keeps `smile_best_score` up to date.

    A trial that completes counts as "finished", or as "stopped" when `final_key` is given and its last result
    lacks that key (the scheduler ended it before its final report); only finished trials can set the best score.
    An errored trial counts as "failed" once it will not be retried.
    """

    def __init__(self, sweep: str, metric: str, mode: str = "max", final_key: str | None = None,
                 refresh_seconds: float = 5.0):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metrics = SweepMetrics(sweep)
        self.metric, self.mode, self.final_key = metric, mode, final_key
        self.refresh_seconds = refresh_seconds
        self.best: float | None = None
        self._last_refresh = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        final = self.final_key is None or self.final_key in result
        self.metrics.trial_finished("finished" if final else "stopped")
        value = _lookup(result, self.metric)
        if final and isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = float(value)
                self.metrics.best_score(self.best, self.metric)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.metrics.trial_finished("failed")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if self.best is not None and now - self._last_refresh >= self.refresh_seconds:
            self._last_refresh = now
            self.metrics.best_score(self.best, self.metric)       # keeps the gauge exported (see the module doc)

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")


class DiskSpaceGuard(tune.Callback):
    """Stops the sweep (SIGINT to the driver, Tune's own Ctrl-C path) once --output has less than `min_free` MiB
    free; checked at most every `interval` seconds of Tune's loop."""

    def __init__(self, output: str | os.PathLike, min_free: float, interval: float = 1.0) -> None:
        self.output, self.min_free, self.interval = Path(output), min_free, interval
        self._next = 0.0
        self._stopping = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_next": 0.0, "_stopping": False}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self._stopping or now < self._next:
            return
        self._next = now + self.interval
        if free_mib(self.output) < self.min_free:
            self._stopping = True
            logger.warning("--output %s is nearly full (under %g MiB free): stopping the sweep, its state saved",
                           self.output, self.min_free)
            os.kill(os.getpid(), signal.SIGINT)
