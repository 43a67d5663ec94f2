"""smile_ray.metrics: names as Ray exports them (scraped from the local node), the driver callback, the dashboard."""
import json
import math
import pickle
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from smile_ray.metrics import EXPORTED, METRICS, SweepMetrics
from smile_ray.tracking import MetricsCallback

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "smile_sweep.json"
SWEEP = "pytest_metrics"
SCRAPE_SECONDS = 60      # Ray's workers report to the node's agent every 10 s by default (slower on a busy machine)
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match["name"], dict(_LABEL.findall(match["labels"] or "")), float(match["value"])))
    return samples


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for n, tags, v in samples if n == name and all(tags.get(k) == x for k, x in labels.items()))


def _expected_exports(spec) -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}[spec.kind]
    return {f"ray_{spec.name}{suffix}" for suffix in suffixes}


# --- the metric definitions -------------------------------------------------------------------------------------

def test_names_tags_and_exported_names_follow_the_metric_kinds():
    assert len({m.name for m in METRICS}) == len(METRICS)
    for spec in METRICS:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", spec.name) and spec.name.startswith("smile_")
        assert "sweep" in spec.tags and spec.description
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0
    assert set(EXPORTED) == set().union(*(_expected_exports(m) for m in METRICS))
    assert len(EXPORTED) == len(set(EXPORTED))


@pytest.mark.parametrize("call", [
    lambda m: m.trial_finished("done"),
    lambda m: m.svd_seconds(-1.0),
    lambda m: m.svd_seconds(float("nan")),
    lambda m: m.svd_seconds(1.0, source="driver"),
    lambda m: m.eval_throughput(float("inf")),
    lambda m: m.best_score(float("nan")),
])
def test_invalid_values_are_rejected(call):
    with pytest.raises(ValueError):
        call(SweepMetrics("s"))


def test_bad_sweep_or_mode_is_rejected():
    with pytest.raises(ValueError):
        SweepMetrics("")
    with pytest.raises(ValueError):
        MetricsCallback("s", "average/accuracy", mode="maximize")


def test_importing_and_recording_without_ray_starts_nothing():
    code = ("import ray, smile_ray.metrics as m\n"
            "s = m.SweepMetrics('s'); s.trial_finished('finished'); s.svd_seconds(1.0); s.eval_throughput(5.0)\n"
            "s.best_score(0.5); s.refresh()\n"
            "assert not ray.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- what the node exports ----------------------------------------------------------------------------------------

def test_recorded_metrics_are_exported_under_the_listed_names(ray_session):
    """Records every metric (from the driver and from an actor, as a trial would) and scrapes the node's /metrics.

    If the agent exports nothing of ours on 127.0.0.1 within SCRAPE_SECONDS (a very slow machine, or Ray bound to
    another address), the test is skipped: the recording calls have still run without error. Names that appear
    but are not listed fail it.
    """
    ray = ray_session
    metrics = SweepMetrics(SWEEP)
    metrics.trial_finished("finished")
    metrics.trial_finished("failed")
    metrics.svd_seconds(1.5)                           # the driver is no actor: source "prefill"
    metrics.eval_throughput(120.0, trial="t0")
    metrics.best_score(0.75, "average/accuracy")

    @ray.remote(num_cpus=0)
    class FakeTrial:                                   # Tune runs each trial in an actor: source "trial"
        def run(self):
            recorder = SweepMetrics(SWEEP)
            recorder.svd_seconds(0.25)
            recorder.eval_throughput(50.0, trial="t1")

    actor = FakeTrial.remote()
    ray.get(actor.run.remote())
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + SCRAPE_SECONDS
    while True:
        try:
            samples = _samples(urllib.request.urlopen(url, timeout=5).read().decode())
        except OSError:                                # the agent not listening (yet) on loopback
            samples = []
        ours = {name for name, tags, _ in samples if tags.get("sweep") == SWEEP}
        from_the_actor = _total(samples, "ray_smile_svd_compute_seconds_total", sweep=SWEEP, source="trial") > 0
        if (ours >= set(EXPORTED) and from_the_actor) or time.monotonic() > deadline:
            break                                      # (the driver's records arrive first, the actor's later)
        metrics.refresh()
        time.sleep(1)
    ray.kill(actor)
    if not ours:
        pytest.skip(f"{url} showed none of the recorded metrics within {SCRAPE_SECONDS} s")
    assert ours == set(EXPORTED)
    assert {n for n, _, _ in samples if n.startswith("ray_smile_")} <= set(EXPORTED)
    assert _total(samples, "ray_smile_trials_completed_total", sweep=SWEEP, status="failed") == 1
    assert _total(samples, "ray_smile_svd_compute_seconds_total", sweep=SWEEP, source="prefill") == 1.5
    assert _total(samples, "ray_smile_svd_compute_seconds_total", sweep=SWEEP, source="trial") == 0.25
    assert _total(samples, "ray_smile_svd_seconds_bucket", sweep=SWEEP, source="prefill", le="+Inf") == 1
    assert _total(samples, "ray_smile_eval_samples_per_second_count", sweep=SWEEP) == 2
    assert _total(samples, "ray_smile_trial_eval_samples_per_second", sweep=SWEEP, trial="t1") == 50.0
    assert _total(samples, "ray_smile_best_score", sweep=SWEEP, metric="average/accuracy") == 0.75


# --- the driver callback ------------------------------------------------------------------------------------------

class _Recorder(SweepMetrics):
    def __init__(self):
        super().__init__("s")
        self.calls = []

    def trial_finished(self, status):
        self.calls.append(("ended", status))

    def best_score(self, value, metric="score"):
        self.calls.append(("best", value, metric))


def _trial(**last_result):
    return SimpleNamespace(last_result=last_result)


@pytest.mark.parametrize("mode, expected_best", [("max", 0.9), ("min", 0.4)])
def test_callback_counts_trials_and_keeps_the_best_final_score(mode, expected_best):
    callback = MetricsCallback("s", "average/accuracy", mode, final_key="report")
    callback.metrics = recorder = _Recorder()
    callback.on_trial_complete(0, [], _trial(**{"average/accuracy": 0.5, "report": {}}))
    callback.on_trial_complete(0, [], _trial(average={"accuracy": 0.9}, report={}))      # nested result
    callback.on_trial_complete(0, [], _trial(**{"average/accuracy": 0.99}))             # stopped early: not final
    callback.on_trial_complete(0, [], _trial(**{"average/accuracy": 0.4, "report": {}}))
    callback.on_trial_complete(0, [], _trial(**{"average/accuracy": math.nan, "report": {}}))
    callback.on_trial_error(0, [], _trial())
    ended = [c[1] for c in recorder.calls if c[0] == "ended"]
    assert ended == ["finished", "finished", "stopped", "finished", "finished", "failed"]
    assert callback.best == expected_best
    assert [c[1] for c in recorder.calls if c[0] == "best"] == ([0.5, 0.9] if mode == "max" else [0.5, 0.4])


def test_callback_without_final_key_counts_every_completed_trial_as_finished():
    callback = MetricsCallback("s", "score")
    callback.metrics = recorder = _Recorder()
    callback.on_trial_complete(0, [], _trial(score=1.0))
    assert recorder.calls == [("ended", "finished"), ("best", 1.0, "score")]


def test_callback_refreshes_the_best_score_and_survives_pickling_and_restore():
    callback = MetricsCallback("s", "score", refresh_seconds=0.0)
    callback.metrics = recorder = _Recorder()
    callback.on_step_end(0, [])
    assert recorder.calls == []                         # no best yet: nothing to refresh
    callback.set_state({"best": 0.3})
    callback.on_step_end(1, [])
    assert recorder.calls == [("best", 0.3, "score")]
    restored = pickle.loads(pickle.dumps(MetricsCallback("s", "score", "min")))
    restored.set_state(callback.get_state())
    assert (restored.best, restored.mode, restored.metrics.sweep) == (0.3, "min", "s")


# --- the dashboard ------------------------------------------------------------------------------------------------

def _targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    targets = _targets(dashboard)
    assert targets
    charted = set()
    for title, expr in targets:
        names = set(re.findall(r"\bray_smile_[a-zA-Z0-9_]+", expr))
        assert names, f"{title}: {expr} charts no ray_smile_* metric"
        assert names <= set(EXPORTED), f"{title}: {sorted(names - set(EXPORTED))} are not exported"
        assert all(re.search(rf'{n}\{{[^}}]*sweep=~"\$sweep"', expr) for n in names), f"{title}: not filtered by sweep"
        charted |= names
    assert charted == set(EXPORTED)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "sweep" in variables["sweep"]["definition"] and variables["sweep"]["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_use_the_datasource_variable_and_fit_the_grid():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
