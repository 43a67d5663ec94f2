"""Ray custom metrics of a sweep, exported by every node's metrics agent as `ray_smile_*` for Prometheus/Grafana.

Who records what:
- SVD prefill tasks and trials that computed SVDs: `SweepMetrics(sweep).svd_seconds(seconds)`;
- trials, after each evaluated task: `SweepMetrics(sweep).eval_throughput(samples_per_second)`;
- the driver, through the Tune callback `tracking.MetricsCallback`: trials ended (by status) and the best
  score so far. (Kept out of this module, so that SVD-prefill tasks recording here never import `ray.tune`.)

What Ray 2.60 exports (scraped from a local node's `/metrics`; `tests/test_metrics.py` checks it again):
- a Counter `smile_x` becomes `ray_smile_x_total` (the OpenTelemetry exporter, Ray's default, adds `_total` and
  exports no `_total`-less gauge copy);
- a Histogram `smile_y` becomes `ray_smile_y_bucket{le=...}`, `ray_smile_y_sum` and `ray_smile_y_count`. The agent
  rebuilds `_sum` from bucket midpoints, so it is approximate: the exact SVD total is the counter
  `smile_svd_compute_seconds`;
- a Gauge `smile_z` becomes `ray_smile_z`, but only while its process keeps setting it: the agent drops a value it
  has not received for two report intervals (about 20 s by default). `MetricsCallback` re-sets the best score every
  few seconds for that reason; a trial's throughput gauge lives while the trial is evaluating.
Every series also carries Ray's own labels (SessionName, NodeAddress, WorkerId, Component, Version), so queries
aggregate with `sum by (...)` or `max by (...)`.

Outside Ray (`ray.is_initialized()` false, e.g. `python -m smile_ray.run`) every recording call does nothing.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

TRIAL_STATUSES = ("finished", "stopped", "failed")   # stopped: ended early by the scheduler (ASHA)
SVD_SOURCES = ("prefill", "trial")

# One observation is one prefill task's or one trial's SVD time: from a tiny benchmark to an LLM layer stack.
SVD_SECONDS_BOUNDARIES = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# One observation is one task's evaluation in a trial: a tiny CPU model up to CLIP on a large GPU.
EVAL_SAMPLES_PER_SECOND_BOUNDARIES = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000,
                                      100000)


@dataclass(frozen=True)
class MetricSpec:
    """One Ray metric: its name as created (Ray prefixes `ray_` on export), kind, help text and tag keys."""
    name: str
    kind: str                       # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


METRICS = (
    MetricSpec("smile_trials_completed", "counter",
               "Trials of the sweep that ended, by status: finished, stopped (early, by the scheduler), failed.",
               ("sweep", "status")),
    MetricSpec("smile_svd_seconds", "histogram",
               "Seconds spent computing SVDs, one observation per SVD-prefill task or trial that computed any.",
               ("sweep", "source"), SVD_SECONDS_BOUNDARIES),
    MetricSpec("smile_svd_compute_seconds", "counter",
               "Seconds spent computing SVDs, exact running total.", ("sweep", "source")),
    MetricSpec("smile_eval_samples_per_second", "histogram",
               "Evaluation throughput (samples/s), one observation per task evaluated by a trial.",
               ("sweep",), EVAL_SAMPLES_PER_SECOND_BOUNDARIES),
    MetricSpec("smile_trial_eval_samples_per_second", "gauge",
               "Latest evaluation throughput (samples/s) of a running trial.", ("sweep", "trial")),
    MetricSpec("smile_best_score", "gauge",
               "Best final score of the sweep's metric so far (set by the driver).", ("sweep", "metric")),
)

# The Prometheus names these metrics have on a node's /metrics endpoint (Ray 2.60, scraped).
EXPORTED = (
    "ray_smile_trials_completed_total",
    "ray_smile_svd_seconds_bucket",
    "ray_smile_svd_seconds_sum",
    "ray_smile_svd_seconds_count",
    "ray_smile_svd_compute_seconds_total",
    "ray_smile_eval_samples_per_second_bucket",
    "ray_smile_eval_samples_per_second_sum",
    "ray_smile_eval_samples_per_second_count",
    "ray_smile_trial_eval_samples_per_second",
    "ray_smile_best_score",
)

_instruments: dict[str, Any] = {}     # name → the Ray metric object, created once per process on first use


def _instrument(name: str):
    """This process's Ray metric object for `name`, created on first use (needs an initialized Ray)."""
    if name not in _instruments:
        from ray.util.metrics import Counter, Gauge, Histogram

        spec = next(m for m in METRICS if m.name == name)
        if spec.kind == "counter":
            _instruments[name] = Counter(spec.name, spec.description, tag_keys=spec.tags)
        elif spec.kind == "gauge":
            _instruments[name] = Gauge(spec.name, spec.description, tag_keys=spec.tags)
        else:
            _instruments[name] = Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                                           tag_keys=spec.tags)
    return _instruments[name]


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _in_actor() -> bool:
    """True in a Ray actor (Tune runs each trial in one), false in a task or the driver."""
    import ray

    return ray.get_runtime_context().get_actor_id() is not None


def _current_trial_id() -> str | None:
    """The Tune trial id when called inside a trial, else None."""
    from ray import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # outside a trial Tune warns and returns None
        return tune.get_context().get_trial_id()


class SweepMetrics:
    """Records the `smile_*` metrics of one sweep, every series tagged `sweep=<name>`.

    Cheap to create and to pickle (it holds the sweep name and the gauge values it set); the Ray metric objects are
    created lazily, once per process, on the first recording call.
    """

    def __init__(self, sweep: str):
        if not isinstance(sweep, str) or not sweep:
            raise ValueError(f"sweep must be a non-empty string, got {sweep!r}")
        self.sweep = sweep
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}   # (name, tags) → last value

    def trial_finished(self, status: str) -> None:
        """Count one trial that ended; status is "finished", "stopped" (early, by the scheduler) or "failed"."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"status must be one of {TRIAL_STATUSES}, got {status!r}")
        if _ray_running():
            _instrument("smile_trials_completed").inc(1, tags={"sweep": self.sweep, "status": status})

    def svd_seconds(self, seconds: float, source: str | None = None) -> None:
        """Record seconds spent computing SVDs. source: "prefill" or "trial"; by default "trial" inside a Ray
        actor (a Tune trial), else "prefill"."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        if source is not None and source not in SVD_SOURCES:
            raise ValueError(f"source must be one of {SVD_SOURCES}, got {source!r}")
        if not _ray_running():
            return
        tags = {"sweep": self.sweep, "source": source or ("trial" if _in_actor() else "prefill")}
        _instrument("smile_svd_seconds").observe(float(seconds), tags=tags)
        if seconds > 0:                                  # a Ray Counter only takes increments > 0
            _instrument("smile_svd_compute_seconds").inc(float(seconds), tags=tags)

    def eval_throughput(self, samples_per_second: float, trial: str | None = None) -> None:
        """Record one task evaluation's throughput (samples/s): the sweep's histogram and the trial's gauge.
        trial: the Tune trial id; by default the current trial's ("none" outside Tune)."""
        if not math.isfinite(samples_per_second) or samples_per_second < 0:
            raise ValueError(f"samples_per_second must be finite and >= 0, got {samples_per_second!r}")
        if not _ray_running():
            return
        _instrument("smile_eval_samples_per_second").observe(float(samples_per_second), tags={"sweep": self.sweep})
        self._set_gauge("smile_trial_eval_samples_per_second", samples_per_second,
                        {"sweep": self.sweep, "trial": trial or _current_trial_id() or "none"})

    def best_score(self, value: float, metric: str = "score") -> None:
        """Set the best score so far of the sweep's metric (e.g. metric="average/accuracy")."""
        if not math.isfinite(value):
            raise ValueError(f"best score must be finite, got {value!r}")
        self._set_gauge("smile_best_score", value, {"sweep": self.sweep, "metric": metric})

    def refresh(self) -> None:
        """Set every gauge this object set again, so Ray's agent keeps exporting it (it drops values older than
        two report intervals)."""
        if _ray_running():
            for (name, tags), value in self._gauges.items():
                _instrument(name).set(value, tags=dict(tags))

    def _set_gauge(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._gauges[(name, tuple(sorted(tags.items())))] = float(value)
        if _ray_running():
            _instrument(name).set(float(value), tags=tags)
