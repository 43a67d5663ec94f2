"""MLflow sweep tracking: the Tune callback driven directly with fake trials, the plots, and one real Tune run."""
from __future__ import annotations

import json
import itertools
import logging
import pickle
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import smile_ray.mlflow_runs
import smile_ray.tracking
from smile_ray.plots import best_point, heatmap_cells, pareto_front, sweep_figures
from smile_ray.report import build_report, flatten_metrics
from smile_ray.errors import SmileError
from smile_ray.hub import check_server
from smile_ray.mlflow_runs import (absolute_sqlite_uri, default_artifact_location, find_sweep, flatten_config,
                                   git_commit, per_task_table, result_metrics, run_name)
from smile_ray.tracking import MlflowSweepCallback

TASKS = ("a", "b")
SPACE = {"method": {"name": "smile", "gate_k": {"grid_search": [1, 2]}, "k": {"grid_search": [4, -1]}}}


@dataclass
class FakeTrial:
    """What the callback reads from a `ray.tune.experiment.Trial`."""

    trial_id: str
    config: dict
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)
    error_file: str | None = None

    def __str__(self) -> str:
        return f"toy_{self.trial_id}"


def accuracies(method: dict) -> dict[str, float]:
    """Deterministic fake per-task accuracies of a configuration."""
    if method["name"] == "individual":
        own = method.get("model")
        return {task: 0.9 if task == own else 0.3 for task in TASKS}
    k = 64 if method["k"] < 0 else method["k"]
    return {task: min(0.99, 0.4 + 0.01 * method["gate_k"] + 0.005 * k + 0.01 * i) for i, task in enumerate(TASKS)}


def fake_results(config: dict, trial_id: str) -> list[dict]:
    """Tune-like results: one per task with the running average, the last with flat report metrics and `report`."""
    acc = accuracies(config["method"])
    results, done = [], {}
    for i, task in enumerate(TASKS, start=1):
        done[task] = {"accuracy": acc[task], "loss": 1.0 - acc[task]}
        result = {f"{task}/accuracy": acc[task], f"{task}/loss": 1.0 - acc[task],
                  "average/accuracy": sum(m["accuracy"] for m in done.values()) / len(done),
                  "training_iteration": i, "time_total_s": 0.5 * i, "time_this_iter_s": 0.5, "timestamp": 1,
                  "pid": 123, "hostname": "h", "node_ip": "127.0.0.1", "date": "x", "done": False,
                  "trial_id": trial_id, "experiment_tag": "0", "config": config, "is_last": i == len(TASKS)}
        if i == len(TASKS):
            extra = 0 if config["method"]["name"] == "individual" else 1000 * config["method"]["gate_k"]
            report = build_report(done, model_info={"trainable_params": 100 + extra, "all_params": 100 + extra,
                                                    "trainable_percentage": 1.0, "svd_calls": 3},
                                  timings={"svd_seconds": 0.1, "eval_seconds": 0.2})
            result.update(flatten_metrics({k: v for k, v in report.items() if k not in TASKS}), report=report)
        results.append(result)
    return results


def run_fake(cb: MlflowSweepCallback, trial: FakeTrial, *, complete: bool = True) -> None:
    trial.status = "RUNNING"
    cb.on_trial_start(iteration=0, trials=[], trial=trial)
    for result in fake_results(trial.config, trial.trial_id):
        trial.last_result = result
        cb.on_trial_result(iteration=0, trials=[], trial=trial, result=result)
    if complete:
        trial.status = "TERMINATED"
        cb.on_trial_complete(iteration=0, trials=[], trial=trial)


def fail_fake(cb: MlflowSweepCallback, trial: FakeTrial, error_dir: Path) -> None:
    trial.status = "RUNNING"
    cb.on_trial_start(iteration=0, trials=[], trial=trial)
    trial.error_file = str(error_dir / f"error_{trial.trial_id}.txt")
    Path(trial.error_file).write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    trial.status = "ERROR"
    cb.on_trial_error(iteration=0, trials=[], trial=trial)


def smile(gate_k: int, k: int, top_k: int = 1) -> dict:
    return {"method": {"name": "smile", "gate_k": gate_k, "k": k, "top_k": top_k}, "task_pool": {"kind": "toy"}}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store per module (creating the schema takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def client(tracking_uri) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def make_callback(tracking_uri: str, experiment: str, **kwargs: Any) -> MlflowSweepCallback:
    return MlflowSweepCallback(tracking_uri, experiment, space_name="toy", space=SPACE, tags={"owner": "tests"},
                               strict=True, **kwargs)


def runs(client: MlflowClient, experiment_id: str) -> tuple[list, list]:
    """(parents, children) of an experiment."""
    everything = client.search_runs([experiment_id], max_results=1000)
    children = [r for r in everything if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    return parents, children


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


# -- pure helpers ----------------------------------------------------------------------------------------------------

def test_result_metrics_keep_numbers_and_drop_tune_bookkeeping():
    result = fake_results(smile(4, 8), "t1")[-1]
    metrics = result_metrics({**result, "nested": {"x": 1, "flag": True}, "__duplicate__": 1, "name": "s"})
    assert metrics["b/accuracy"] == pytest.approx(0.4 + 0.04 + 0.04 + 0.01)
    assert metrics["model_info/all_params"] == 4100.0 and metrics["timings/svd_seconds"] == 0.1
    assert metrics["nested/x"] == 1.0
    for key in ("training_iteration", "time_total_s", "time_this_iter_s", "timestamp", "pid", "done", "is_last",
                "nested/flag", "__duplicate__", "report/average/accuracy", "config/method/gate_k"):
        assert key not in metrics


def test_config_flattening_run_name_and_artifact_location(tmp_path):
    config = {"method": {"name": "smile", "gate_k": 4, "k": -1, "targets": ["mlp"], "average_experts": False},
              "seed": 0}
    assert flatten_config(config) == {"method.name": "smile", "method.gate_k": 4, "method.k": -1,
                                      "method.targets": ["mlp"], "method.average_experts": False, "seed": 0}
    assert run_name(config, "a_00001") == "smile gk4 dense targets=mlp"
    assert run_name({"method": {"name": "smile", "gate_k": 16, "k": 32, "top_k": 2, "routing_use_diff": False}},
                    "a_00002") == "smile gk16 k32 top2 W-routing"
    assert run_name({"method": {"name": "individual", "model": "sun397"}}, "a_00003") == "individual sun397"
    assert run_name({"method": {"name": "task_arithmetic", "scaling": 0.3}}, "a_00004") == "task_arithmetic λ0.3"
    assert run_name({"seed": 0}, "a_00005") == "trial a_00005"
    assert default_artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlartifacts").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000") is None
    assert absolute_sqlite_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{Path('runs/mlflow.db').resolve()}"
    assert absolute_sqlite_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"


def test_heatmap_cells_take_the_best_per_cell_and_put_dense_last():
    rows, cols, values = heatmap_cells([(4, 8, 0.5), (4, 8, 0.7), (1, -1, 0.6), (1, 16, 0.2), (4, -2, 0.1),
                                        (4, 16, float("nan"))])
    assert rows == [1, 4] and cols == [8, 16, "dense"]
    assert values == [[None, 0.2, 0.6], [0.7, None, 0.1]]
    _, _, lowest = heatmap_cells([(4, 8, 0.5), (4, 8, 0.7)], mode="min")
    assert lowest == [[0.5]]


def test_pareto_front_prefers_fewer_parameters_and_higher_score():
    costs, scores = [10, 20, 20, 30, 5, 40], [0.5, 0.7, 0.6, 0.65, 0.5, 0.9]
    assert pareto_front(costs, scores) == [4, 1, 5]
    assert pareto_front(costs, scores, mode="min") == [4]


def test_sweep_figures_skip_plots_without_data():
    def point(config: dict, trial_id: str) -> dict:
        result = fake_results(config, trial_id)[-1]
        return {"trial_id": trial_id, "config": flatten_config(config), "metrics": result_metrics(result),
                "report": result["report"]}

    individuals = [point({"method": {"name": "individual", "model": t}}, t) for t in TASKS]
    assert set(sweep_figures(individuals)) == {"plots/pareto.png", "plots/per_task.png"}
    only_smile = [point(smile(1, 4), "s1"), point(smile(2, -1), "s2")]
    assert set(sweep_figures(only_smile)) == {"plots/heatmap.png", "plots/pareto.png"}
    bare = [{"trial_id": "x", "config": {"method.name": "simple_average"}, "metrics": {"average/accuracy": 0.5},
             "report": None}]
    assert sweep_figures(bare) == {}


def test_sweep_figures_are_legible_whole_and_on_one_scale():
    def point(config: dict, trial_id: str) -> dict:
        result = fake_results(config, trial_id)[-1]
        return {"trial_id": trial_id, "config": flatten_config(config), "metrics": result_metrics(result),
                "report": result["report"]}

    best = {"method": {"name": "smile", "gate_k": 2, "k": 4, "top_k": 1, "routing_use_diff": True,
                       "average_experts": False}}
    points = [point(best, "s1"), point(smile(1, 4), "s2"),
              *(point({"method": {"name": "individual", "model": t}}, t) for t in TASKS)]
    figures = sweep_figures(points)
    for path, figure in figures.items():
        figure.canvas.draw()                                    # Agg, as MLflow's log_figure renders it
        width, height = figure.canvas.get_width_height()
        assert width >= 640 and height >= 480, (path, width, height)
        box = figure.bbox
        for legend in [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend())]:
            extent = legend.get_window_extent()
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, path
    legend = [t.get_text() for t in figures["plots/per_task.png"].legends[0].get_texts()]
    winner = best_point(points, "average/accuracy")["config"]
    named = run_name({"method": {k.removeprefix("method."): v for k, v in winner.items()}}, "x")
    assert legend[0] == f"best: {named}"                    # the run's name ("individual a"), not a clipped dump
    labels = {path: figure.axes[0].get_ylabel() for path, figure in figures.items()}
    assert labels["plots/pareto.png"] == "average/accuracy (%)" and labels["plots/per_task.png"] == "accuracy (%)"
    assert "(%)" in figures["plots/heatmap.png"].axes[0].get_title()
    bars = [patch.get_height() for patch in figures["plots/per_task.png"].axes[0].patches]
    assert max(bars) > 1                                           # in %, as the heatmap and the Pareto plot


def test_best_point_breaks_ties_by_fewer_extra_params_then_trial_id():
    def point(trial_id: str, value: float, extra: float | None = None, report: bool = True) -> dict:
        metrics = {"average/accuracy": value, **({} if extra is None else {"model_info/extra_params": extra})}
        return {"trial_id": trial_id, "config": {}, "metrics": metrics, "report": {"x": 1} if report else None}

    # the same average summed in another order differs in the last bit: still a tie
    tie_a, tie_b = (0.1 + 0.2 + 0.3) / 3, (0.3 + 0.2 + 0.1) / 3
    assert tie_a > tie_b
    points = [point("a", tie_a, 3.51e6), point("b", tie_b, 1.05e6), point("c", tie_a),      # no count: loses
              point("d", 0.15), point("e", 0.99, 0.0, report=False)]                          # stopped early: ignored
    for order in itertools.permutations(points):                # the choice does not depend on the order
        assert best_point(list(order), "average/accuracy")["trial_id"] == "b"
    for order in itertools.permutations([point("z", 0.5, 7), point("y", 0.5, 7), point("x", 0.5)]):
        assert best_point(list(order), "average/accuracy")["trial_id"] == "y"
    lowest = [point("m2", 0.1, 5), point("m1", 0.1, 5), point("m0", 0.2, 1)]
    assert best_point(lowest, "average/accuracy", mode="min")["trial_id"] == "m1"
    assert best_point([], "average/accuracy") is None
    assert smile_ray.tracking.best_point is best_point          # MLflow's best is summary.json's


def test_git_commit_is_the_packages_checkout_not_the_working_directory(tmp_path, monkeypatch):
    repo = Path(smile_ray.mlflow_runs.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("smile_ray is not imported from a git checkout")
    monkeypatch.chdir(tmp_path)                                 # launched from outside the checkout
    assert git_commit() == head.stdout.strip()
    assert git_commit(tmp_path) is None
    installed = tmp_path / "site-packages" / "smile_ray"      # an install outside any checkout
    installed.mkdir(parents=True)
    monkeypatch.setattr(smile_ray.mlflow_runs, "__file__", str(installed / "mlflow_runs.py"))
    assert git_commit() is None


# -- the callback, driven directly -----------------------------------------------------------------------------------

def test_sweep_layout_in_mlflow(tracking_uri, client, tmp_path, monkeypatch):
    cb = make_callback(tracking_uri, "layout")
    cb.setup()
    configs = {"s1": smile(1, 4), "s2": smile(2, 4), "s3": smile(2, -1), "s4": smile(2, -1, top_k=2),
               "ia": {"method": {"name": "individual", "model": "a"}},
               "ib": {"method": {"name": "individual", "model": "b"}},
               "ip": {"method": {"name": "individual", "model": "pretrained"}}}
    trials = [FakeTrial(trial_id, config) for trial_id, config in configs.items()]
    for trial in trials:
        run_fake(cb, trial)
    broken = FakeTrial("bad", smile(8, 8))
    fail_fake(cb, broken, tmp_path)
    cb.on_experiment_end(trials=[*trials, broken])

    parents, children = runs(client, cb.experiment_id)
    assert [p.info.run_id for p in parents] == [cb.parent_run_id]
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith((Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri())
    assert parent.data.tags["smile_ray.space"] == "toy" and parent.data.tags["owner"] == "tests"
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40            # the tests run in a git checkout
    assert {"space.yaml", "best_config.json", "plots"} <= artifacts(client, cb.parent_run_id)
    assert artifacts(client, cb.parent_run_id, "plots") == {"plots/heatmap.png", "plots/pareto.png",
                                                           "plots/per_task.png"}

    assert len(children) == 8 and set(cb.run_ids) == {*configs, "bad"}
    assert all(c.data.tags["mlflow.parentRunId"] == cb.parent_run_id for c in children)
    s3 = client.get_run(cb.run_ids["s3"])
    assert s3.info.status == "FINISHED" and s3.info.run_name == "smile gk2 dense"
    assert client.get_run(cb.run_ids["ia"]).info.run_name == "individual a"
    experiment = client.get_experiment(cb.experiment_id)       # the UI opens on its runs, not on GenAI traces
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert s3.data.tags["trial_id"] == "s3" and s3.data.tags["smile_ray.stopped_early"] == "false"
    assert s3.data.params == {"method.name": "smile", "method.gate_k": "2", "method.k": "-1", "method.top_k": "1",
                              "task_pool.kind": "toy"}
    assert {"average/accuracy", "a/accuracy", "b/loss", "model_info/all_params", "model_info/svd_calls",
            "timings/svd_seconds"} <= set(s3.data.metrics)
    assert not {"training_iteration", "time_total_s", "pid", "timestamp"} & set(s3.data.metrics)
    history = client.get_metric_history(cb.run_ids["s3"], "average/accuracy")
    assert [m.step for m in history] == [1, 2]
    assert {"report.json", "per_task.json", "config.yaml"} <= artifacts(client, cb.run_ids["s3"])
    report = json.loads(Path(client.download_artifacts(cb.run_ids["s3"], "report.json", str(tmp_path))).read_text())
    assert report["a"]["accuracy"] == pytest.approx(accuracies(configs["s3"]["method"])["a"])

    finished = [cb.run_ids[t] for t in configs]
    table = per_task_table(tracking_uri, [*finished, cb.run_ids["bad"]])
    assert len(table) == 2 * len(configs) and set(table["task"]) == set(TASKS)
    row = table[(table["run_id"] == cb.run_ids["ia"]) & (table["task"] == "a")]
    assert row["accuracy"].tolist() == [0.9]
    # mlflow.load_table reads the global tracking URI and active experiment, even through MlflowClient.load_table
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", cb.experiment_id)
    loaded = mlflow.load_table("per_task.json", run_ids=finished, extra_columns=["run_id"])
    assert sorted(map(tuple, loaded[["run_id", "task", "accuracy"]].values.tolist())) == \
        sorted(map(tuple, table[["run_id", "task", "accuracy"]].values.tolist()))

    bad = client.get_run(cb.run_ids["bad"])
    assert bad.info.status == "FAILED" and bad.data.tags["smile_ray.error"] == "RuntimeError: out of memory"
    assert "error.txt" in artifacts(client, cb.run_ids["bad"])

    assert parent.data.tags["best.trial_id"] == "s3"                # s4 ties with it; the first one stays
    assert parent.data.tags["best.method.gate_k"] == "2" and parent.data.tags["best.method.k"] == "-1"
    assert parent.data.tags["best.run_id"] == cb.run_ids["s3"]
    assert parent.data.metrics["best/average/accuracy"] == pytest.approx(0.4 + 0.02 + 0.32 + 0.005)
    assert parent.data.metrics["best/a/accuracy"] == pytest.approx(0.4 + 0.02 + 0.32)     # from the report
    assert parent.data.metrics["best/model_info/all_params"] == 2100


def test_state_round_trip_reuses_parent_and_children(tracking_uri, client):
    cb = make_callback(tracking_uri, "resume")
    cb.setup()
    done, running = FakeTrial("t1", smile(1, 4)), FakeTrial("t2", smile(2, 4))
    run_fake(cb, done)
    run_fake(cb, running, complete=False)
    state = pickle.loads(pickle.dumps(cb.get_state()))
    late = FakeTrial("t3", smile(4, 4))                  # started after Tune's last state snapshot
    run_fake(cb, late, complete=False)
    cb.on_experiment_end(trials=[done, running, late])    # e.g. Ctrl+C: unfinished trials remain
    assert client.get_run(cb.parent_run_id).info.status == "KILLED"
    assert client.get_run(cb.run_ids["t2"]).info.status == "KILLED"

    restored = pickle.loads(pickle.dumps(make_callback(tracking_uri, "resume")))   # as Tuner.restore unpickles it
    restored.set_state(state)
    restored.setup()
    assert restored.parent_run_id == cb.parent_run_id
    assert client.get_run(cb.parent_run_id).info.status == "RUNNING"
    for trial in (running, late):
        run_fake(restored, trial)
    assert restored.run_ids == cb.run_ids
    restored.on_experiment_end(trials=[done, running, late])

    parents, children = runs(client, cb.experiment_id)
    assert len(parents) == 1 and len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["smile_ray.resumes"] == "1"
    assert find_sweep(tracking_uri, "resume", cb.sweep_id) == restored.sweep
    assert len(per_task_table(tracking_uri, [cb.run_ids["t2"]])) == len(TASKS)


def test_trials_a_ctrl_c_stopped_are_killed_not_ended_and_give_no_best(tracking_uri, client):
    cb = make_callback(tracking_uri, "interrupted")
    cb.setup()
    trials = [FakeTrial("c1", smile(1, 4)), FakeTrial("c2", smile(2, 4))]
    for trial in trials:
        run_fake(cb, trial, complete=False)
        trial.status = "TERMINATED"            # what Tune's Ctrl-C leaves in memory, with no on_trial_complete
    cb.on_experiment_end(trials=trials)
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "KILLED" and not any(key.startswith("best/") for key in parent.data.metrics)
    assert all(client.get_run(cb.run_ids[t.trial_id]).info.status == "KILLED" for t in trials)


def test_parent_failed_when_every_trial_failed(tracking_uri, client, tmp_path):
    cb = make_callback(tracking_uri, "all_failed")
    cb.setup()
    trials = [FakeTrial("x", smile(1, 4)), FakeTrial("y", smile(2, 4))]
    fail_fake(cb, trials[0], tmp_path)
    cb.on_trial_recover(iteration=0, trials=[], trial=trials[0])       # Tune retries it (max_failures > 0)
    run_fake(cb, trials[0], complete=False)
    retried = client.get_run(cb.run_ids["x"])
    assert retried.info.status == "RUNNING" and retried.data.tags["smile_ray.recoveries"] == "1"
    assert retried.data.tags["smile_ray.previous_error"] == "RuntimeError: out of memory"
    for trial in trials:
        fail_fake(cb, trial, tmp_path)
    assert len(runs(client, cb.experiment_id)[1]) == 2
    cb.on_experiment_end(trials=trials)
    assert client.get_run(cb.parent_run_id).info.status == "FAILED"
    assert "plots" not in artifacts(client, cb.parent_run_id)


def test_tracking_errors_are_warnings_unless_strict(tracking_uri, caplog, monkeypatch):
    cb = MlflowSweepCallback(tracking_uri, "lenient", space_name="toy", space=SPACE)
    cb.setup()

    def refuse(*args, **kwargs):
        raise MlflowException("database is locked")

    monkeypatch.setattr(cb.writer.client, "log_batch", refuse)
    with caplog.at_level(logging.WARNING, logger="smile_ray.tracking"):
        run_fake(cb, FakeTrial("t", smile(1, 4)))
    assert "database is locked" in caplog.text
    cb.strict = True
    with pytest.raises(MlflowException):
        cb.on_trial_result(iteration=0, trials=[], trial=FakeTrial("t", smile(1, 4)), result={"x/y": 1.0})


# -- one real Tune run ----------------------------------------------------------------------------------------------

def toy_trainable(config: dict) -> None:
    """Reports per-task results like the SMILE trainable; fails once for gate_k=2, k=-1 (marker file)."""
    from ray import tune

    method = config["method"]
    marker = Path(config["fail_marker"])
    if method["gate_k"] == 2 and method["k"] == -1 and not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("injected failure")
    for result in fake_results(config, "ignored"):
        metrics = {k: v for k, v in result.items()
                   if k not in ("training_iteration", "time_total_s", "time_this_iter_s", "timestamp", "pid",
                                "hostname", "node_ip", "date", "done", "trial_id", "experiment_tag", "config")}
        tune.report(metrics)


def test_real_tune_run_and_restore(ray_session, tracking_uri, client, tmp_path):
    from ray import tune

    cb = make_callback(tracking_uri, "tune", sweep_id="tune-sweep")
    space = {"method": {"name": "smile", "gate_k": tune.grid_search([1, 2]), "k": tune.grid_search([4, -1])},
             "fail_marker": str(tmp_path / "failed-once")}
    tuner = tune.Tuner(toy_trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric="average/accuracy", mode="max", reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", callbacks=[cb], verbose=0))
    grid = tuner.fit()
    assert grid.num_errors == 1

    parents, children = runs(client, cb.experiment_id)
    assert [p.info.run_id for p in parents] == [cb.parent_run_id] and len(children) == 4
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "injected failure" in failed.data.tags["smile_ray.error"]
    assert client.get_run(cb.parent_run_id).info.status == "FINISHED"

    restored = tune.Tuner.restore(str(tmp_path / "t"), trainable=toy_trainable, resume_errored=True)
    assert restored.fit().num_errors == 0

    sweep = find_sweep(tracking_uri, "tune", "tune-sweep")
    assert sweep.parent_run_id == cb.parent_run_id and set(sweep.run_ids.values()) == set(cb.run_ids.values())
    parents, children = runs(client, cb.experiment_id)
    assert len(parents) == 1 and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    parent = client.get_run(cb.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["smile_ray.resumes"] == "1"
    assert parent.data.tags["best.method.gate_k"] == "2" and parent.data.tags["best.method.k"] == "-1"
    assert {"plots/heatmap.png", "plots/pareto.png"} <= artifacts(client, cb.parent_run_id, "plots")
    assert len(per_task_table(tracking_uri, sweep.run_ids.values())) == 4 * len(TASKS)
    rerun = client.get_run(sweep.run_ids[failed.data.tags["trial_id"]])
    assert [m.step for m in client.get_metric_history(rerun.info.run_id, "average/accuracy")] == [1, 2]
    assert "smile_ray.error" not in rerun.data.tags
    assert rerun.data.tags["smile_ray.previous_error"] == "RuntimeError: injected failure"


def test_check_server_refuses_only_a_tracking_server_that_does_not_answer():
    import http.server
    import socket
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)   # answers 404
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_server(f"http://127.0.0.1:{server.server_port}/prefix")
        check_server(f"http://user:secret@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as free:                     # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(SmileError, match="no server answers .connection refused.") as refused:
        check_server(f"http://user:secret@127.0.0.1:{port}")
    assert "secret" not in str(refused.value)
    check_server("sqlite:///nowhere/mlflow.db")                 # only http(s) is probed
