"""MLflow plumbing for a sweep: valid names and values, the tracking store's URIs, finding a sweep's runs, and reading
them back (`per_task_table`). The Tune callbacks that write a sweep's runs are in `smile_ray.tracking`."""
from __future__ import annotations

import math
import numbers
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from smile_ray.report import flatten_metrics

if TYPE_CHECKING:
    import pandas


MAX_METRICS_PER_BATCH = 1000


MAX_PARAMS_PER_BATCH = 100


MAX_PARAM_LENGTH = 6000


MAX_TAG_LENGTH = 8000


MAX_KEY_LENGTH = 250


# Keys Tune adds to every result (ray.tune.result): bookkeeping, not metrics. `report` is the final
# FusionBench report, logged as report.json; its numbers are expected flat in the result too.
TUNE_RESULT_KEYS = frozenset({
    "training_iteration", "timestamp", "date", "done", "pid", "hostname", "node_ip", "config", "trial_id",
    "experiment_id", "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "iterations_since_restore",
    "timesteps_total", "timesteps_since_restore", "timesteps_this_iter", "episodes_total", "episodes_this_iter",
    "report",
})


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"        # what the MLflow UI reads to choose an experiment's view


MODEL_TRAINING = "custom_model_development"


_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def is_bookkeeping(key: str) -> bool:
    """Whether a result key is Tune's bookkeeping (TUNE_RESULT_KEYS, "time_…", "__…") rather than a metric."""
    return key in TUNE_RESULT_KEYS or str(key).startswith(("time_", "__"))


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one Tune result: numeric leaves (nested mappings joined with "/"), without Tune's bookkeeping
    and without booleans."""
    return flatten_metrics({key: value for key, value in result.items() if not is_bookkeeping(key)})


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys ("method.gate_k"); other values, lists included, kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def metric_key(key: str) -> str | None:
    """A valid MLflow param/metric key (disallowed characters replaced by "_"), or None if it cannot be one."""
    key = _BAD_NAME_CHARS.sub("_", key)
    if not key or len(key) > MAX_KEY_LENGTH or os.path.normpath(key) != key or key.startswith("/"):
        return None
    return key


def param_value(value: Any) -> str:
    return str(value)[:MAX_PARAM_LENGTH]


def run_name(config: Mapping[str, Any], trial_id: str) -> str:
    """A child run's name: what tells its configuration from the others ("smile gk16 k32", "individual sun397";
    `methods.describe`), or the trial id for a configuration without a method section."""
    from smile_ray.methods import describe

    method = config.get("method")
    return (describe(method) if isinstance(method, Mapping) else "") or f"trial {trial_id}"


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD of the git checkout holding `cwd`, or None when it is not in one (or git is missing).

    The default is the directory the smile_ray package is imported from, not the current directory: the commit
    of the code that runs, wherever the sweep is launched from (None for an install outside a checkout)."""
    directory = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    commands = [["git", "rev-parse", "HEAD"]]
    if cwd is None:     # the package's own file is tracked there: an install in a venv inside another checkout is not
        commands.append(["git", "ls-files", "--error-unmatch", Path(__file__).name])
    try:
        outs = [subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=10)
                for command in commands]
    except (OSError, subprocess.SubprocessError):
        return None
    commit = outs[0].stdout.strip()
    tracked = all(out.returncode == 0 for out in outs)
    return commit if tracked and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def ray_job_id() -> str | None:
    """The Ray job id of this driver, or None when Ray is not initialized."""
    try:
        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - a best-effort tag
        return None


def open_store(tracking_uri: str) -> None:
    """Open the tracking store ahead of its first use (a new sqlite file creates its tables: about 2 s). MLflow
    keeps one store per URI, so the sweep's callback later finds it open."""
    MlflowClient(tracking_uri=tracking_uri)


def absolute_sqlite_uri(tracking_uri: str) -> str:
    """`sqlite:///relative.db` made absolute (Tuner.restore may run from another directory); other URIs as given."""
    if not tracking_uri.startswith("sqlite:///"):
        return tracking_uri
    db, sep, query = tracking_uri[len("sqlite:///"):].partition("?")
    if not db or db == ":memory:" or os.path.isabs(db):
        return tracking_uri
    return f"sqlite:///{Path(db).resolve()}{sep}{query}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, `<db dir>/mlartifacts` as a file URI (MLflow would otherwise use ./mlruns relative to
    the current directory); None for other stores (their server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


@dataclass(frozen=True)
class SweepRuns:
    """Where a sweep lives in MLflow."""

    experiment_id: str
    parent_run_id: str
    run_ids: dict[str, str]                         # trial_id -> child run id


def find_sweep(tracking_uri: str, experiment: str, sweep_id: str) -> SweepRuns | None:
    """The newest parent run tagged `smile_ray.sweep_id = sweep_id` in `experiment`, with its children by trial id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`smile_ray.sweep_id` = '{sweep_id}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None
    parent = parents[0].info.run_id
    return SweepRuns(found.experiment_id, parent, children_of(client, found.experiment_id, parent))


def per_task_table(tracking_uri: str, run_ids: Iterable[str], artifact_file: str = "per_task.json"
                   ) -> "pandas.DataFrame":
    """The per-task tables of `run_ids` as one pandas DataFrame with a `run_id` column (runs without it skipped).

    Same rows as `mlflow.load_table(artifact_file, run_ids=..., extra_columns=["run_id"])`, which only works when the
    global tracking URI and active experiment point at the sweep (MlflowClient.load_table searches through the
    fluent API too)."""
    import tempfile

    import pandas as pd

    client = MlflowClient(tracking_uri=tracking_uri)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            if artifact_file not in {a.path for a in client.list_artifacts(run_id)}:
                continue
            path = client.download_artifacts(run_id, artifact_file, os.path.join(tmp, run_id))
            frames.append(pd.read_json(path, orient="split").assign(run_id=run_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task", "run_id"])


def children_of(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str | None = None
              ) -> dict[str, str]:
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" AND tags.trial_id = '{trial_id}'"
    children: dict[str, str] = {}
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"],
                                  page_token=page_token)
        children.update({run.data.tags["trial_id"]: run.info.run_id for run in page if "trial_id" in run.data.tags})
        page_token = page.token
        if not page_token:
            return children


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def plain(value: Any) -> Any:
    """JSON/YAML-safe copy: mappings and sequences recursed, numbers and strings kept, anything else as str."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return str(value)
