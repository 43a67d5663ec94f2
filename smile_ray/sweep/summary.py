"""The end of a sweep: whether every trial ran (Tune's saved state tells), summary.json, and the ranked table."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from smile_ray.errors import user_message, without_credentials
from smile_ray.spec import SweepSpec
from smile_ray.sweep.record import SweepOptions


def _scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A trial's final values for summary.json: metrics and short strings (node_id, device), no bookkeeping."""
    from smile_ray.mlflow_runs import is_bookkeeping

    return {k: v for k, v in result.items() if not is_bookkeeping(k) and isinstance(v, (int, float, str, bool))}


def build_summary(spec: SweepSpec, results, runs, options: SweepOptions,
                  failures: dict[str, int] | None = None) -> dict[str, Any]:
    """summary.json: every trial (id, status, method config, final metrics, MLflow run, how many of its attempts
    failed: a trial Tune retried after its node was lost has finished with one) and the best one."""
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
                       "failed_attempts": (failures or {}).get(trial_id, 0),
                       "error": None if result.error is None else user_message(result.error)[:500]})
    return {"space": spec.name, "metric": metric, "mode": mode, "trials": trials,
            "best": best_point([t for t in trials if t["status"] == "finished"], metric, mode),
            "mlflow": {"tracking_uri": without_credentials(options.tracking_uri), "experiment": options.experiment,
                       "experiment_id": runs.experiment_id if runs else None,
                       "parent_run_id": runs.parent_run_id if runs else None}}


def _status(trial: dict[str, Any]) -> str:
    """A trial's status; one stopped early says after how many tasks, or samples per task (its score is their running
    average)."""
    if trial["status"] != "stopped":
        return trial["status"]
    samples, done = trial["metrics"].get("samples_per_task"), trial["metrics"].get("tasks_done")
    if samples:
        return f"stopped at {int(samples)} samples per task"
    return f"stopped after {int(done)} task(s)" if done else trial["status"]


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


def saved_trials(experiment: Path) -> list:
    """The trials of the experiment Tune saved in `experiment` (its saved state, not Tune's in-memory view)."""
    from ray.tune import ExperimentAnalysis

    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)          # "could not fetch metrics" of trials stopped before reporting
    try:
        return ExperimentAnalysis(str(experiment)).trials
    finally:
        analysis_log.setLevel(level)


def sweep_complete(trials: list, trial_count: int) -> bool:
    """Whether the saved `trials` (`saved_trials`) are all `trial_count` trials, each run to an end (finished,
    stopped early by the scheduler, or failed). After Ctrl-C Tune returns normally and marks the trials it stopped
    TERMINATED in memory, but saves them as PENDING, for a restore to run again: the saved state tells."""
    return len(trials) >= trial_count and all(trial.status in ("TERMINATED", "ERROR") for trial in trials)
